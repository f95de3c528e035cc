/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/getsockopt: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) from the 4-tuple map, the
 * way conntrack answers it under iptables, so a sidecar cannot tell the modes apart.
 *
 * Runs after the kernel's own handler. Any other option passes untouched (retval and
 * buffer as the kernel left them); so does SO_ORIGINAL_DST when we know nothing.
 */
#include "lib/helpers.h"

#define MI_PAGE_SIZE 4096

struct mi_sockaddr_in {
	__u16 sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 sin_zero[8];
};

static __always_inline int __mi_original_dst(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_sockaddr_in *sa;
	struct mi_tuple key = {};
	struct mi_origin *orig;
	struct mi_config *cfg;
	struct mi_event ev = {};
	__u64 netns;

	if (!sk || sk->protocol != MI_IPPROTO_TCP)
		return MI_E_PROTO;
	if (sk->family != MI_AF_INET &&
	    !(sk->family == MI_AF_INET6 && mi_is_v4mapped(sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2])))
		return MI_E_PROTO;
	netns = bpf_get_netns_cookie(ctx);
	cfg = mi1_config.lookup(&netns);
	if (!cfg)
		return MI_E_NOTMANAGED;
	/* bpf_sock: src_port is host order, dst_port network order. */
	key.netns = netns;
	key.local_ip = sk->src_ip4;
	key.local_port = (__u16)sk->src_port;
	key.remote_ip = sk->dst_ip4;
	key.remote_port = mi_ntohs(sk->dst_port);
	ev.netns = netns;
	ev.src_ip = key.remote_ip;
	ev.src_port = key.remote_port;
	ev.dst_ip = key.local_ip;
	ev.dst_port = key.local_port;
	mi_task_ids(&ev);
	orig = mi1_origdst.lookup(&key);
	if (!orig) {
		MI_COUNT(netns, origdst_misses, 1);
		ev.kind = MI_EV_ORIGDST_MISS;
		ev.reason = MI_E_NOTMANAGED;
		MI_DEBUG(cfg, "SO_ORIGINAL_DST miss lport=%u rport=%u", key.local_port, key.remote_port);
		mi_emit(cfg, &ev);
		return MI_E_NOTMANAGED;
	}
	sa = ctx->optval;
	if ((void *)(sa + 1) > ctx->optval_end)
		return MI_E_NOSPC;
	sa->sin_family = MI_AF_INET;
	sa->sin_port = mi_htons(orig->port);
	sa->sin_addr = orig->ip;
	__builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
	/* volatile: clang would fuse the two 4-byte stores into one 8-byte store the
	 * verifier rejects as a context access. */
	*(volatile __s32 *)&ctx->optlen = sizeof(*sa);
	*(volatile __s32 *)&ctx->retval = 0;
	MI_COUNT(netns, origdst_answers, 1);
	ev.kind = MI_EV_ORIGDST;
	ev.new_ip = orig->ip;
	ev.new_port = orig->port;
	MI_DEBUG(cfg, "SO_ORIGINAL_DST rport=%u -> %pI4:%u", key.remote_port, &ev.new_ip, ev.new_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

int mi_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level == MI_SOL_IP && ctx->optname == MI_SO_ORIGINAL_DST) {
		__mi_original_dst(ctx);
		return 1;
	}
	/* Options larger than a page reach us truncated; optlen 0 hands the kernel's own
	 * answer back unchanged (Documentation/bpf/prog_cgroup_sockopt.rst). */
	if (ctx->optlen > MI_PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}
