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
#define MI_E_LOOPBACK (-40)   /* -ELOOP: destination on 127.0.0.0/8 */
#define MI_E_OWNPOD (-18)     /* -EXDEV: proxy to its own pod, goes straight to the app */
#define MI_E_NOMEM (-12)      /* -ENOMEM: storage or map update failed */
#define MI_E_NOSPC (-28)      /* -ENOSPC: user buffer too small */
#define MI_E_PROTO (-93)      /* -EPROTONOSUPPORT: not IPv4/TCP */

#define MI_AF_INET 2
#define MI_IPPROTO_TCP 6
#define MI_SOL_IP 0
#define MI_SO_ORIGINAL_DST 80
#define MI_LOOPBACK_NET 0x7f000000u
#define MI_LOCALHOST 0x7f000001u

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

static __always_inline int mi_is_loopback(__be32 ip)
{
	return (mi_ntohl(ip) & 0xff000000u) == MI_LOOPBACK_NET;
}

/* Keep clang from turning an index into a pointer walk the verifier cannot bound. */
#define mi_barrier_var(v) asm volatile("" : "+r"(v))

/*
 * The lists live in the map value. Both loops compare a barrier'd copy of the counter with
 * the list length: given the counter itself, clang merges `i < MAX` and `i >= n` into one
 * exit test against n (up to 65535), which 6.1's verifier cannot bound ("The sequence of
 * 8193 jumps is too complex"); with the copy the constant bound stays its own test. The
 * index is masked too, so every access is inside its array whatever clang does.
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

static __always_inline int mi_cidr_excluded(const struct mi_config *cfg, __be32 ip)
{
	for (__u32 i = 0; i < MI_MAX_CIDRS; i++) {
		__u32 idx = i;

		mi_barrier_var(idx);
		if (idx >= cfg->n_exclude_out_cidrs)
			break;
		idx &= MI_MAX_CIDRS - 1;
		if ((ip & cfg->exclude_out_cidrs[idx].mask) == cfg->exclude_out_cidrs[idx].addr)
			return 1;
	}
	return 0;
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
	struct mi_counters *c = mi1_counters.lookup(&netns);

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
	mi1_events.ringbuf_output(ev, sizeof(*ev), 0);
}

static __always_inline void mi_task_ids(struct mi_event *ev)
{
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->uid = (__u32)bpf_get_current_uid_gid();
}

#endif /* MI_LIB_HELPERS_H */
