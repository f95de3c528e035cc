/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sk_lookup (one BPF link on each managed pod's network namespace): inbound without
 * touching packets, IPv4 and IPv6, same-node and cross-node alike.
 *
 * The kernel runs this when a new connection (a SYN no established socket owns) looks for
 * a listener. A pod address's redirected port is handed to the sidecar's inbound listener
 * with bpf_sk_assign; the accepted socket keeps the real destination as its local
 * address, so nothing is rewritten, nothing is remembered per connection, and getsockopt
 * answers the original destination from that socket. Established packets never come here.
 *
 * Fail closed: with no inbound listener registered (sidecar not started, restarting,
 * crashed) the connection is refused (SK_DROP: the SYN finds no socket and gets a reset),
 * never handed to the app. Everything else passes to the normal lookup.
 *
 * bpf_get_netns_cookie() is not offered to sk_lookup programs: the namespace is found
 * through the pod IP map by the destination address, which always belongs to this
 * namespace. A pod talking to itself is skipped (the sidecar dialling its own app on the pod
 * address): loopback by interface, and any connection whose source is one of the pod's own
 * addresses, because local traffic to the pod address does not report the loopback device
 * as its ingress interface.
 */
#include "lib/helpers.h"

static __always_inline void mi_lookup_event(const struct mi_config *cfg, struct bpf_sk_lookup *ctx, __u32 kind,
					    __u64 netns, const struct mi_addr *local, __u16 port, int reason)
{
	struct mi_event ev = {};

	if (!(cfg->flags & MI_CFG_DEBUG))
		return;
	ev.kind = kind;
	ev.netns = netns;
	ev.reason = reason;
	if (ctx->family == MI_AF_INET6)
		MI_ADDR_V6(&ev.src_ip, ctx->remote_ip6);
	else
		MI_ADDR_V4(&ev.src_ip, ctx->remote_ip4);
	ev.src_port = mi_ntohs((__u16)ctx->remote_port);
	ev.dst_ip = *local;
	ev.dst_port = port;
	ev.new_ip = *local;
	ev.new_port = cfg->inbound_port;
	mi_emit(cfg, &ev);
}

/* The registered listener for this family, or for IPv4 a dual-stack AF_INET6 one. */
static __always_inline struct bpf_sock *mi_listener(__u64 netns, int v4)
{
	struct mi_listen_key key = {};
	struct bpf_sock *sk;

	key.netns = netns;
	key.family = v4 ? 4 : 6;
	sk = (struct bpf_sock *)mi3_listen.lookup(&key);
	if (sk || !v4)
		return sk;
	key.family = 6;
	sk = (struct bpf_sock *)mi3_listen.lookup(&key);
	return sk;
}

/* The source is one of this namespace's own pod addresses. */
static __always_inline int mi_from_itself(struct bpf_sk_lookup *ctx, __u64 netns)
{
	struct mi_addr remote = {};
	struct mi_pod *pod;

	if (ctx->family == MI_AF_INET6)
		MI_ADDR_V6(&remote, ctx->remote_ip6);
	else
		MI_ADDR_V4(&remote, ctx->remote_ip4);
	pod = mi3_podip.lookup(&remote);
	return pod && pod->netns == netns;
}

static __always_inline int __mi_lookup(struct bpf_sk_lookup *ctx)
{
	struct mi_addr local = {};
	struct mi_config *cfg;
	struct bpf_sock *sk;
	struct mi_pod *pod;
	__u64 netns;
	__u16 port;
	long err;

	/* Another program chose a socket already: while an upgrade moves a namespace between
	 * builds (backends/ebpf/upgrade.py), the old build's link runs first and wins. */
	if (ctx->sk)
		return SK_PASS;
	if (ctx->protocol != MI_IPPROTO_TCP || ctx->ingress_ifindex == MI_LOOPBACK_IFINDEX)
		return SK_PASS;
	if (ctx->family == MI_AF_INET6)
		MI_ADDR_V6(&local, ctx->local_ip6);
	else
		MI_ADDR_V4(&local, ctx->local_ip4);
	pod = mi3_podip.lookup(&local);
	if (!pod)
		return SK_PASS;
	netns = pod->netns;
	cfg = mi3_config.lookup(&netns);
	if (!cfg || (cfg->flags & MI_CFG_INBOUND_TC) || !mi_family_on(cfg, &local))
		return SK_PASS;
	port = (__u16)ctx->local_port;
	if (!mi_inbound_redirected(cfg, port) || mi_from_itself(ctx, netns))
		return SK_PASS;
	sk = mi_listener(netns, ctx->family != MI_AF_INET6);
	if (!sk) {
		MI_COUNT(netns, inbound_refused, 1);
		MI_DEBUG(cfg, "sk_lookup refused port %u: no inbound listener", port);
		mi_lookup_event(cfg, ctx, MI_EV_REFUSED, netns, &local, port, MI_E_NOLISTENER);
		return SK_DROP;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		/* e.g. a v6-only listener for an IPv4 connection: refused, never the app */
		MI_COUNT(netns, inbound_refused, 1);
		mi_lookup_event(cfg, ctx, MI_EV_REFUSED, netns, &local, port, (int)err);
		return SK_DROP;
	}
	MI_COUNT(netns, inbound_steered, 1);
	MI_DEBUG(cfg, "sk_lookup port %u -> inbound listener %u", port, cfg->inbound_port);
	mi_lookup_event(cfg, ctx, MI_EV_STEERED, netns, &local, port, 0);
	return SK_PASS;
}

int mi_lookup(struct bpf_sk_lookup *ctx)
{
	return __mi_lookup(ctx);
}
