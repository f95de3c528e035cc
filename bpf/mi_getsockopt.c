/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/getsockopt: answer getsockopt(SOL_IP, SO_ORIGINAL_DST) and getsockopt(SOL_IPV6,
 * IP6T_SO_ORIGINAL_DST) the way conntrack answers them under iptables, so a sidecar cannot
 * tell the modes apart:
 *
 *   SOL_IP   on an IPv4 connection (AF_INET socket, or AF_INET6 with a v4-mapped peer):
 *            struct sockaddr_in with the IPv4 original destination;
 *   SOL_IPV6 on a native IPv6 connection: struct sockaddr_in6.
 *
 * The origin is the 4-tuple map's entry (outbound, tc inbound), else, for a socket sockops
 * marked as steered by sk_lookup, the socket's own local address: sk_lookup never rewrites
 * the destination, so the accepted socket holds it.
 *
 * UDP (--capture-dns): the DNS sidecar asks on a UDP socket it connected to a client's
 * address; connect4/6 put that client's query's origin into the socket's storage
 * (lib/dns.h mi_dns_ask). The kernel itself has no answer for UDP, under any mode.
 *
 * Runs after the kernel's own handler. Any other option passes untouched (retval and
 * buffer as the kernel left them); so does a question we know nothing about.
 */
#include "lib/helpers.h"

#define MI_PAGE_SIZE 4096

struct mi_sockaddr_in {
	__u16 sin_family;
	__be16 sin_port;
	__be32 sin_addr;
	__u8 sin_zero[8];
};

struct mi_sockaddr_in6 {
	__u16 sin6_family;
	__be16 sin6_port;
	__be32 sin6_flowinfo;
	__be32 sin6_addr[4];
	__u32 sin6_scope_id;
};

static __always_inline void mi_sk_addrs(struct bpf_sock *sk, struct mi_tuple *key)
{
	if (sk->family == MI_AF_INET6) {
		MI_ADDR_V6(&key->local_ip, sk->src_ip6);
		MI_ADDR_V6(&key->remote_ip, sk->dst_ip6);
	} else {
		MI_ADDR_V4(&key->local_ip, sk->src_ip4);
		MI_ADDR_V4(&key->remote_ip, sk->dst_ip4);
	}
	/* bpf_sock: src_port is host order, dst_port network order. */
	key->local_port = (__u16)sk->src_port;
	key->remote_port = mi_ntohs(sk->dst_port);
}

static __always_inline int mi_answer(struct bpf_sockopt *ctx, const struct mi_addr *ip, __u16 port)
{
	if (mi_addr_is_v4(ip)) {
		struct mi_sockaddr_in *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return MI_E_NOSPC;
		sa->sin_family = MI_AF_INET;
		sa->sin_port = mi_htons(port);
		sa->sin_addr = ip->w[3];
		__builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
		/* volatile: clang would fuse the two 4-byte stores into one 8-byte store the
		 * verifier rejects as a context access. */
		*(volatile __s32 *)&ctx->optlen = sizeof(*sa);
	} else {
		struct mi_sockaddr_in6 *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return MI_E_NOSPC;
		sa->sin6_family = MI_AF_INET6;
		sa->sin6_port = mi_htons(port);
		sa->sin6_flowinfo = 0;
		sa->sin6_addr[0] = ip->w[0];
		sa->sin6_addr[1] = ip->w[1];
		sa->sin6_addr[2] = ip->w[2];
		sa->sin6_addr[3] = ip->w[3];
		sa->sin6_scope_id = 0;
		*(volatile __s32 *)&ctx->optlen = sizeof(*sa);
	}
	*(volatile __s32 *)&ctx->retval = 0;
	return MI_OK;
}

/* The answer (or miss) both protocols report the same way. */
static __always_inline int mi_origdst_done(struct bpf_sockopt *ctx, const struct mi_config *cfg, struct mi_event *ev,
					   int found)
{
	int ret;

	if (!found) {
		MI_COUNT(ev->netns, origdst_misses, 1);
		ev->kind = MI_EV_ORIGDST_MISS;
		ev->reason = MI_E_NOTMANAGED;
		MI_DEBUG(cfg, "SO_ORIGINAL_DST miss lport=%u rport=%u", ev->dst_port, ev->src_port);
		mi_emit(cfg, ev);
		return MI_E_NOTMANAGED;
	}
	ret = mi_answer(ctx, &ev->new_ip, ev->new_port);
	if (ret)
		return ret;
	MI_COUNT(ev->netns, origdst_answers, 1);
	ev->kind = MI_EV_ORIGDST;
	MI_DEBUG(cfg, "SO_ORIGINAL_DST rport=%u -> port %u", ev->src_port, ev->new_port);
	mi_emit(cfg, ev);
	return MI_OK;
}

/* UDP: the DNS sidecar's socket connected to a client (see the top of this file). */
static __always_inline int __mi_dns_original_dst(struct bpf_sockopt *ctx, struct bpf_sock *sk, __u64 netns,
						 const struct mi_config *cfg, int want_v4)
{
	struct mi_event ev = {};
	struct mi_sock *s;

	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (s && (s->flags & MI_SOCK_DNS_ASKED) && mi_addr_is_v4(&s->orig_ip) != want_v4)
		return MI_E_FAMILY;
	ev.netns = netns;
	ev.proto = MI_IPPROTO_UDP;
	mi_task_ids(&ev);
	if (sk->family == MI_AF_INET6)
		MI_ADDR_V6(&ev.src_ip, sk->dst_ip6);
	else
		MI_ADDR_V4(&ev.src_ip, sk->dst_ip4);
	ev.src_port = mi_ntohs(sk->dst_port);
	if (!s || !(s->flags & MI_SOCK_DNS_ASKED))
		return mi_origdst_done(ctx, cfg, &ev, 0);
	ev.new_ip = s->orig_ip;
	ev.new_port = s->orig_port;
	return mi_origdst_done(ctx, cfg, &ev, 1);
}

static __always_inline int __mi_original_dst(struct bpf_sockopt *ctx, int want_v4)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_tuple key = {};
	struct mi_origin *orig;
	struct mi_config *cfg;
	struct mi_event ev = {};
	struct mi_sock *s;
	__u64 netns;

	if (!sk || (sk->family != MI_AF_INET && sk->family != MI_AF_INET6))
		return MI_E_PROTO;
	if (sk->protocol != MI_IPPROTO_TCP && sk->protocol != MI_IPPROTO_UDP)
		return MI_E_PROTO;
	netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&netns);
	if (!cfg)
		return MI_E_NOTMANAGED;
	if (sk->protocol == MI_IPPROTO_UDP)
		return __mi_dns_original_dst(ctx, sk, netns, cfg, want_v4);
	key.netns = netns;
	mi_sk_addrs(sk, &key);
	/* SOL_IP answers IPv4 connections only, SOL_IPV6 native IPv6 ones: as conntrack does. */
	if (mi_addr_is_v4(&key.local_ip) != want_v4)
		return MI_E_FAMILY;
	ev.netns = netns;
	ev.src_ip = key.remote_ip;
	ev.src_port = key.remote_port;
	ev.dst_ip = key.local_ip;
	ev.dst_port = key.local_port;
	mi_task_ids(&ev);
	orig = mi3_origdst.lookup(&key);
	if (orig) {
		ev.new_ip = orig->ip;
		ev.new_port = orig->port;
		return mi_origdst_done(ctx, cfg, &ev, 1);
	}
	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (!s || !(s->flags & MI_SOCK_STEERED))
		return mi_origdst_done(ctx, cfg, &ev, 0);
	ev.new_ip = key.local_ip;
	ev.new_port = key.local_port;
	return mi_origdst_done(ctx, cfg, &ev, 1);
}

int mi_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname == MI_SO_ORIGINAL_DST && (ctx->level == MI_SOL_IP || ctx->level == MI_SOL_IPV6)) {
		__mi_original_dst(ctx, ctx->level == MI_SOL_IP);
		return 1;
	}
	/* Options larger than a page reach us truncated; optlen 0 hands the kernel's own
	 * answer back unchanged (Documentation/bpf/prog_cgroup_sockopt.rst). */
	if (ctx->optlen > MI_PAGE_SIZE)
		ctx->optlen = 0;
	return 1;
}
