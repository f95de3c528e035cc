/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Small helpers every hook uses: byte order, address tests, counters, debug output.
 *
 * bcc rewrites map calls (x.lookup(), x.ringbuf_output()) only in its main file, so the
 * loader pastes this file at the top of the compile unit (then the include guard keeps
 * each hook's own #include from repeating it). Plain header guards, not #pragma once,
 * for exactly that reason.
 */
#ifndef MI_LIB_HELPERS_H
#define MI_LIB_HELPERS_H

#include "common.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

/* Errnos the workers return to say why they left a connection alone (cilium style). */
#define MI_OK 0
#define MI_E_NOTMANAGED (-2)  /* -ENOENT: namespace not managed / nothing known */
#define MI_E_EXCLUDED (-1)    /* -EPERM: an exclusion (port, CIDR) matched */
#define MI_E_PROXY (-114)     /* -EALREADY: the proxy's own traffic */
#define MI_E_LOOPBACK (-40)   /* -ELOOP: destination on 127.0.0.0/8 or ::1 */
#define MI_E_OWNPOD (-18)     /* -EXDEV: proxy to its own pod, goes straight to the app */
#define MI_E_NOMEM (-12)      /* -ENOMEM: storage or map update failed */
#define MI_E_NOSPC (-28)      /* -ENOSPC: user buffer too small */
#define MI_E_PROTO (-93)      /* -EPROTONOSUPPORT: not IPv4/IPv6 TCP */

#define MI_E_FAMILY (-97)    /* -EAFNOSUPPORT: a family the namespace's spec leaves alone */
#define MI_E_LOOKUP (-115)   /* -EINPROGRESS: the destination steers its own inbound (sk_lookup) */
#define MI_E_NOLISTENER (-111) /* -ECONNREFUSED: no inbound listener, refused (fail closed) */
#define MI_E_NODNS (-61)       /* -ENODATA: DNS capture is off, or port 53 is excluded */
#define MI_QUIET 1             /* not ours to decide (UDP that is not DNS): no event, no count */

#define MI_AF_INET 2
#define MI_AF_INET6 10
#define MI_IPPROTO_TCP 6
#define MI_IPPROTO_UDP 17
#define MI_SOL_IP 0
#define MI_SOL_IPV6 41
#define MI_SO_ORIGINAL_DST 80 /* IP6T_SO_ORIGINAL_DST is 80 too, at SOL_IPV6 */
#define MI_LOOPBACK_NET 0x7f000000u
#define MI_LOCALHOST 0x7f000001u
#define MI_LOOPBACK_IFINDEX 1

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define mi_ntohs(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define mi_htons(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define mi_ntohl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#define mi_htonl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#else
#define mi_ntohs(x) ((__u16)(x))
#define mi_htons(x) ((__u16)(x))
#define mi_ntohl(x) ((__u32)(x))
#define mi_htonl(x) ((__u32)(x))
#endif

/* Keep clang from turning an index into a pointer walk the verifier cannot bound. */
#define mi_barrier_var(v) asm volatile("" : "+r"(v))

/* --- addresses (struct mi_addr: 16 bytes, IPv4 as ::ffff:a.b.c.d) --------------------- */
static __always_inline void mi_addr_v4(struct mi_addr *a, __be32 ip)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = mi_htonl(0x0000ffffu);
	a->w[3] = ip;
}

/*
 * Hook contexts (and struct bpf_sock) hold addresses as u32 fields that must be read one
 * load each. The barrier after every load keeps clang from sinking the IPv4 and IPv6
 * branches' loads into one load through a computed pointer at the join, which the
 * verifier refuses ("dereference of modified ctx ptr", "pointer arithmetic on sock").
 */
#define MI_CTX_WORD(dst, src)             \
	do {                              \
		__u32 __mi_w = (src);     \
		mi_barrier_var(__mi_w);   \
		(dst) = __mi_w;           \
	} while (0)

#define MI_ADDR_V6(a, field)                          \
	do {                                          \
		MI_CTX_WORD((a)->w[0], (field)[0]);   \
		MI_CTX_WORD((a)->w[1], (field)[1]);   \
		MI_CTX_WORD((a)->w[2], (field)[2]);   \
		MI_CTX_WORD((a)->w[3], (field)[3]);   \
	} while (0)

#define MI_ADDR_V4(a, field)                          \
	do {                                          \
		__be32 __mi_v4;                       \
		MI_CTX_WORD(__mi_v4, (field));        \
		mi_addr_v4((a), __mi_v4);             \
	} while (0)

/*
 * A sock_addr program (connect, sendmsg, recvmsg, getpeername) shows the kernel another
 * address: IPv4 as one word (v4-mapped addresses are stored whole, the word is the last
 * one), IPv6 as one 4-byte store per word, which is what the context accepts.
 */
static __always_inline void mi_ctx_set(struct bpf_sock_addr *ctx, int v6, const struct mi_addr *ip, __u16 port)
{
	if (v6) {
		ctx->user_ip6[0] = ip->w[0];
		ctx->user_ip6[1] = ip->w[1];
		ctx->user_ip6[2] = ip->w[2];
		ctx->user_ip6[3] = ip->w[3];
	} else {
		ctx->user_ip4 = ip->w[3];
	}
	ctx->user_port = mi_htons(port);
}

static __always_inline int mi_addr_is_v4(const struct mi_addr *a)
{
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == mi_htonl(0x0000ffffu);
}

static __always_inline int mi_addr_eq(const struct mi_addr *a, const struct mi_addr *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

/* 127.0.0.0/8 (plain or mapped) or ::1: never redirected, never steered. */
static __always_inline int mi_addr_is_loopback(const struct mi_addr *a)
{
	if (mi_addr_is_v4(a))
		return (mi_ntohl(a->w[3]) & 0xff000000u) == MI_LOOPBACK_NET;
	return a->w[0] == 0 && a->w[1] == 0 && a->w[2] == 0 && a->w[3] == mi_htonl(1);
}

/* Where outbound lands: 127.0.0.1 for IPv4 (mapped for an AF_INET6 socket), [::1] for IPv6. */
static __always_inline void mi_addr_localhost_like(struct mi_addr *out, const struct mi_addr *dst)
{
	if (mi_addr_is_v4(dst)) {
		mi_addr_v4(out, mi_htonl(MI_LOCALHOST));
		return;
	}
	out->w[0] = 0;
	out->w[1] = 0;
	out->w[2] = 0;
	out->w[3] = mi_htonl(1);
}

static __always_inline int mi_family_on(const struct mi_config *cfg, const struct mi_addr *a)
{
	return cfg->flags & (mi_addr_is_v4(a) ? MI_CFG_IPV4 : MI_CFG_IPV6);
}

/*
 * The lists live in the map value. Both loops compare a barrier'd copy of the counter with
 * the list length: given the counter itself, clang merges `i < MAX` and `i >= n` into one
 * exit test against n (up to 65535), which 6.1's verifier cannot bound; with the copy the
 * constant bound stays its own test. The index is masked too, so every access is inside
 * its array whatever clang does.
 */
static __always_inline int mi_port_in(const __u16 *list, __u16 n, __u16 port)
{
	for (__u32 i = 0; i < MI_MAX_PORTS; i++) {
		__u32 idx = i;

		mi_barrier_var(idx);
		if (idx >= n)
			break;
		if (list[idx & (MI_MAX_PORTS - 1)] == port)
			return 1;
	}
	return 0;
}

static __always_inline int mi_cidr_excluded(const struct mi_config *cfg, const struct mi_addr *ip)
{
	for (__u32 i = 0; i < MI_MAX_CIDRS; i++) {
		const struct mi_cidr *c;
		__u32 idx = i;

		mi_barrier_var(idx);
		if (idx >= cfg->n_exclude_out_cidrs)
			break;
		c = &cfg->exclude_out_cidrs[idx & (MI_MAX_CIDRS - 1)];
		if ((ip->w[0] & c->mask.w[0]) == c->addr.w[0] && (ip->w[1] & c->mask.w[1]) == c->addr.w[1] &&
		    (ip->w[2] & c->mask.w[2]) == c->addr.w[2] && (ip->w[3] & c->mask.w[3]) == c->addr.w[3])
			return 1;
	}
	return 0;
}

/*
 * The outbound rule every redirect shares (InterceptSpec.outbound_redirected, and for DNS
 * dns_captured): the family is captured, the port and the address are not excluded. Loopback
 * and the proxy UID are the callers' tests: each hook treats them its own way.
 */
static __always_inline int mi_dest_excluded(const struct mi_config *cfg, const struct mi_addr *ip, __u16 port)
{
	if (!mi_family_on(cfg, ip))
		return MI_E_FAMILY;
	if (mi_port_in(cfg->exclude_out_ports, cfg->n_exclude_out_ports, port))
		return MI_E_EXCLUDED;
	if (mi_cidr_excluded(cfg, ip))
		return MI_E_EXCLUDED;
	return MI_OK;
}

/* Same rule as InterceptSpec.inbound_redirected: the proxy's own ports never. */
static __always_inline int mi_inbound_redirected(const struct mi_config *cfg, __u16 port)
{
	if (port == cfg->inbound_port || port == cfg->outbound_port)
		return 0;
	if (mi_port_in(cfg->exclude_in_ports, cfg->n_exclude_in_ports, port))
		return 0;
	if (cfg->n_include_in_ports == 0)
		return 1;
	return mi_port_in(cfg->include_in_ports, cfg->n_include_in_ports, port);
}

/* bcc cannot expand map calls inside macros: count through an index into mi_counters. */
#define MI_COUNTER_INDEX(field) (__builtin_offsetof(struct mi_counters, field) / sizeof(__u64))

static __always_inline void mi_count(__u64 netns, __u32 idx, __u64 n)
{
	struct mi_counters *c = mi3_counters.lookup(&netns);

	if (c)
		((__u64 *)c)[idx] += n;
}

#define MI_COUNT(ns, field, n) mi_count((ns), MI_COUNTER_INDEX(field), (n))

/* trace_pipe lines, only for namespaces whose config has MI_CFG_DEBUG. Each starts with
 * "mi " so `grep bpf_trace_printk` (bcc prefix) and `grep ' mi '` both find them. */
/* bcc's bpf_trace_printk rewrite does not work inside macros: call the raw helper. */
#define MI_DEBUG(cfg, fmt, ...)                                                \
	do {                                                                   \
		if ((cfg) && ((cfg)->flags & MI_CFG_DEBUG)) {                  \
			char __mi_fmt[] = "mi " fmt;                           \
			bpf_trace_printk_(__mi_fmt, sizeof(__mi_fmt), ##__VA_ARGS__); \
		}                                                              \
	} while (0)

static __always_inline void mi_emit(const struct mi_config *cfg, struct mi_event *ev)
{
	if (!cfg || !(cfg->flags & MI_CFG_DEBUG))
		return;
	ev->ts_ns = bpf_ktime_get_ns();
	mi3_events.ringbuf_output(ev, sizeof(*ev), 0);
}

static __always_inline void mi_task_ids(struct mi_event *ev)
{
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->uid = (__u32)bpf_get_current_uid_gid();
}

#endif /* MI_LIB_HELPERS_H */
