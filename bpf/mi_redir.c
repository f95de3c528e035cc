/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sk_msg (attached to the sockhash, opt-in --accelerate): hand payload straight to the
 * peer socket's receive queue instead of down and up the TCP stack.
 *
 * Fail-open: on any miss the message takes the normal path, never a drop. Each socket
 * decides once, on its first message: if the peer is not in the sockhash yet, the socket
 * stays on the normal path for good. Mixing paths would let redirected bytes overtake
 * bytes still queued in TCP (the receive side reads its msg queue first), so a socket
 * never switches.
 */
#include "lib/helpers.h"

static __always_inline int __mi_msg_redirect(struct sk_msg_md *msg, struct mi_sock *s)
{
	__u64 netns = s->key.netns ? s->key.netns : s->peer.netns;
	long verdict;

	if (s->flags & MI_SOCK_MSG_PASS)
		return MI_E_NOTMANAGED;
	verdict = mi3_sockhash.msg_redirect_hash(msg, &s->peer, BPF_F_INGRESS);
	if (verdict == SK_PASS) {
		s->flags |= MI_SOCK_MSG_REDIR;
		MI_COUNT(netns, msg_redirects, 1);
		MI_COUNT(netns, msg_redirect_bytes, msg->size);
		return MI_OK;
	}
	if (!(s->flags & MI_SOCK_MSG_REDIR))
		s->flags |= MI_SOCK_MSG_PASS;
	MI_COUNT(netns, msg_passes, 1);
	return MI_E_NOTMANAGED;
}

int mi_msg_redirect(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct mi_sock *s;

	if (!sk)
		return SK_PASS;
	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (!s || !(s->flags & MI_SOCK_HASHED))
		return SK_PASS;
	__mi_msg_redirect(msg, s);
	return SK_PASS;
}
