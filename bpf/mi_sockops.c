/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops: hand the original destination from the connecting socket to the 4-tuple the
 * accepting sidecar will see, and make sure every entry has an owner that deletes it.
 *
 * ACTIVE_ESTABLISHED (connecting socket, origin saved by connect4): write
 *   origdst[{accepting netns, accepting local = our remote, accepting remote = our local}].
 * PASSIVE_ESTABLISHED (accepting socket of a managed namespace): if an entry exists for its
 *   4-tuple, claim it: from now on this socket deletes it when it closes.
 * STATE_CB -> CLOSE: the owner deletes; the writer deletes only what nobody claimed.
 * With MI_CFG_ACCELERATE both sockets also enter the sockhash (see mi_redir.c).
 */
#include "lib/helpers.h"

#define MI_TCP_CLOSE 7 /* BPF_TCP_CLOSE */

/* sock_ops stores remote_port as (be16 << 16) on little endian, local_port in host order. */
static __always_inline __u16 mi_ops_remote_port(struct bpf_sock_ops *ctx)
{
	return (__u16)mi_ntohl(ctx->remote_port);
}

static __always_inline void mi_own_tuple(struct bpf_sock_ops *ctx, __u64 netns, struct mi_tuple *t)
{
	t->netns = netns;
	t->local_ip = ctx->local_ip4;
	t->remote_ip = ctx->remote_ip4;
	t->local_port = (__u16)ctx->local_port;
	t->remote_port = mi_ops_remote_port(ctx);
	t->pad = 0;
}

static __always_inline void mi_accelerate(struct bpf_sock_ops *ctx, struct mi_sock *s, __u64 netns)
{
	struct mi_tuple self = {};
	struct mi_config *cfg = mi1_config.lookup(&netns);
	long err;

	if (!cfg || !(cfg->flags & MI_CFG_ACCELERATE))
		return;
	mi_own_tuple(ctx, netns, &self);
	/* bcc rewrites map methods only as whole statements or initialisers. */
	err = mi1_sockhash.sock_hash_update(ctx, &self, BPF_ANY);
	if (err == 0)
		s->flags |= MI_SOCK_HASHED;
}

static __always_inline int __mi_active_established(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_origin orig = {};
	struct mi_event ev = {};
	struct mi_sock *s;
	__u64 netns;

	if (!sk)
		return MI_E_NOTMANAGED;
	s = mi1_sock.sk_storage_get(sk, 0, 0);
	if (!s || !(s->flags & MI_SOCK_PENDING))
		return MI_E_NOTMANAGED;
	netns = bpf_get_netns_cookie(ctx);
	s->key.netns = s->key_netns;
	s->key.local_ip = ctx->remote_ip4;
	s->key.remote_ip = ctx->local_ip4;
	s->key.local_port = mi_ops_remote_port(ctx);
	s->key.remote_port = (__u16)ctx->local_port;
	s->key.pad = 0;
	orig.ip = s->orig_ip;
	orig.port = s->orig_port;
	orig.flags = s->flags & (MI_ORIG_OUTBOUND | MI_ORIG_INBOUND_LOCAL);
	orig.src_netns = netns;
	orig.gen = bpf_ktime_get_ns();
	s->gen = orig.gen;
	s->flags &= ~MI_SOCK_PENDING;
	if (mi1_origdst.update(&s->key, &orig)) {
		MI_COUNT(s->key_netns, map_errors, 1);
		return MI_E_NOMEM;
	}
	s->flags |= MI_SOCK_WROTE;
	/* The peer of this socket is the accepting one, keyed as it sees itself. */
	s->peer = s->key;
	bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
	mi_accelerate(ctx, s, netns);

	struct mi_config *cfg = mi1_config.lookup(&netns);
	ev.kind = MI_EV_ESTABLISHED;
	ev.netns = netns;
	ev.src_ip = ctx->local_ip4;
	ev.src_port = (__u16)ctx->local_port;
	ev.dst_ip = ctx->remote_ip4;
	ev.dst_port = mi_ops_remote_port(ctx);
	ev.new_ip = orig.ip;
	ev.new_port = orig.port;
	MI_DEBUG(cfg, "established lport=%u orig %pI4:%u", ev.src_port, &ev.new_ip, ev.new_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

static __always_inline int __mi_passive_established(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_tuple key = {};
	struct mi_origin *orig;
	struct mi_config *cfg;
	struct mi_event ev = {};
	struct mi_sock *s;
	__u64 netns;

	netns = bpf_get_netns_cookie(ctx);
	cfg = mi1_config.lookup(&netns);
	if (!cfg || !sk)
		return MI_E_NOTMANAGED; /* entries are only ever keyed by managed namespaces */
	mi_own_tuple(ctx, netns, &key);
	orig = mi1_origdst.lookup(&key);
	if (!orig)
		return MI_E_NOTMANAGED;
	s = mi1_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	orig->flags |= MI_ORIG_CLAIMED;
	s->key = key;
	s->gen = orig->gen;
	s->flags |= MI_SOCK_OWNS;
	/* The peer is the connecting socket, in the namespace that wrote the entry. */
	s->peer.netns = orig->src_netns;
	s->peer.local_ip = key.remote_ip;
	s->peer.remote_ip = key.local_ip;
	s->peer.local_port = key.remote_port;
	s->peer.remote_port = key.local_port;
	s->peer.pad = 0;
	bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
	if (!(orig->flags & MI_ORIG_INBOUND_TC))
		mi_accelerate(ctx, s, netns);

	ev.kind = MI_EV_CLAIMED;
	ev.netns = netns;
	ev.src_ip = key.remote_ip;
	ev.src_port = key.remote_port;
	ev.dst_ip = key.local_ip;
	ev.dst_port = key.local_port;
	ev.new_ip = orig->ip;
	ev.new_port = orig->port;
	MI_DEBUG(cfg, "accepted rport=%u orig %pI4:%u", key.remote_port, &ev.new_ip, ev.new_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

static __always_inline int __mi_closed(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_origin *orig;
	struct mi_sock *s;

	if (!sk)
		return MI_E_NOTMANAGED;
	s = mi1_sock.sk_storage_get(sk, 0, 0);
	if (!s)
		return MI_E_NOTMANAGED;
	if (!(s->flags & (MI_SOCK_OWNS | MI_SOCK_WROTE)))
		return MI_E_NOTMANAGED;
	orig = mi1_origdst.lookup(&s->key);
	/* A newer connection may have reused the 4-tuple and replaced the entry. */
	if (!orig || orig->gen != s->gen)
		goto out;
	/* The writer deletes only what nobody accepted (refused, reset, listener elsewhere). */
	if (!(s->flags & MI_SOCK_OWNS) && (orig->flags & MI_ORIG_CLAIMED))
		goto out;
	mi1_origdst.delete(&s->key);
	MI_COUNT(s->key.netns, flows_closed, 1);
out:
	s->flags &= ~(MI_SOCK_OWNS | MI_SOCK_WROTE);
	return MI_OK;
}

int mi_sockops(struct bpf_sock_ops *ctx)
{
	if (ctx->family != MI_AF_INET &&
	    !(ctx->family == MI_AF_INET6 && mi_is_v4mapped(ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2])))
		return 1;
	switch (ctx->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		__mi_active_established(ctx);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		__mi_passive_established(ctx);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ctx->args[1] == MI_TCP_CLOSE)
			__mi_closed(ctx);
		break;
	}
	return 1;
}
