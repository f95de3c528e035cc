/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/connect4 and cgroup/connect6: send a managed namespace's outbound TCP to its sidecar,
 * and with --capture-dns its DNS (TCP and connected UDP) to the sidecar's DNS port.
 *
 * TCP, app (not the proxy UID) -> anything not loopback/excluded: remember the original
 * destination in the socket's storage and connect to the outbound port instead (the DNS port
 * for port 53 under --capture-dns): 127.0.0.1 for IPv4, ::ffff:127.0.0.1 for an AF_INET6
 * socket dialling a v4-mapped address (Java and .NET do that for every IPv4 destination),
 * [::1] for native IPv6. A v4-mapped destination is IPv4 for every rule: IPv4 exclusions,
 * 127/8 skipped, the IPv4 family switch.
 * TCP, proxy UID -> a managed pod on this node that uses the tc inbound path (not its own):
 * keep the address, switch the port to that pod's IN port (same-node inbound). A pod on the
 * sk_lookup path steers its own inbound, so the proxy's connect is left alone.
 * UDP, app -> port 53 (libc's connected resolver socket): the same rules, the DNS port, the
 * origin in the socket's storage (lib/dns.h mi_udp_is_query, mi_udp_save).
 * UDP, proxy UID: the DNS sidecar asking where a client's query was going (lib/dns.h
 * mi_dns_ask); the connect itself is never changed.
 *
 * Never rejects a connect: every miss, error or skip lets the connection through untouched.
 */
#include "lib/helpers.h"
#include "lib/dns.h"

static __always_inline int __mi_save_origin(struct bpf_sock *sk, const struct mi_addr *ip, __u16 port,
					    __u64 key_netns, __u16 kind, __u16 redirect_port)
{
	struct mi_sock *s;

	s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	s->orig_ip = *ip;
	s->orig_port = port;
	s->key_netns = key_netns;
	s->redirect_port = redirect_port;
	s->flags = MI_SOCK_PENDING | kind;
	return MI_OK;
}

/* Proxy UID: only a connection to another managed tc-path pod on this node is touched. */
static __always_inline int __mi_same_node_inbound(struct bpf_sock *sk, __u64 netns, struct mi_event *ev)
{
	struct mi_pod *pod = mi3_podip.lookup(&ev->dst_ip);
	struct mi_config *dcfg;
	__u64 dst_netns;
	int ret;

	if (!pod)
		return MI_E_PROXY;
	dst_netns = pod->netns;
	if (dst_netns == netns)
		return MI_E_OWNPOD;
	dcfg = mi3_config.lookup(&dst_netns);
	if (!dcfg)
		return MI_E_PROXY;
	if (!(dcfg->flags & MI_CFG_INBOUND_TC))
		return MI_E_LOOKUP;
	if (!mi_inbound_redirected(dcfg, ev->dst_port))
		return MI_E_EXCLUDED;
	ret = __mi_save_origin(sk, &ev->dst_ip, ev->dst_port, dst_netns, MI_ORIG_INBOUND_LOCAL, dcfg->inbound_port);
	if (ret)
		return ret;
	MI_COUNT(dst_netns, inbound_same_node, 1);
	ev->kind = MI_EV_CONNECT_IN;
	ev->new_ip = ev->dst_ip;
	ev->new_port = dcfg->inbound_port;
	return MI_OK;
}

/*
 * Decide for ev->dst_ip:dst_port, TCP and UDP alike; on MI_OK ev->new_ip:new_port is where the
 * connect (or the datagram) goes. The shared rules (loopback, family, excluded ports and CIDRs)
 * come once for both protocols, so the verifier walks their loops once per program.
 */
static __always_inline int __mi_decide(struct bpf_sock_addr *ctx, struct bpf_sock *sk, __u64 netns,
				       const struct mi_config *cfg, struct mi_event *ev, int sending)
{
	/* sendmsg runs for UDP only: a constant there, so its TCP branches go at compile time */
	int udp = sending || ev->proto == MI_IPPROTO_UDP;
	__u16 kind = MI_ORIG_OUTBOUND, port = cfg->outbound_port;
	int ret;

	if (ev->uid == cfg->proxy_uid) {
		if (!udp)
			return mi_addr_is_loopback(&ev->dst_ip) ? MI_E_LOOPBACK : __mi_same_node_inbound(sk, netns, ev);
		if (!sending)
			return mi_dns_ask(ctx, sk, netns, cfg, ev);
		return ev->dst_port == MI_DNS_PORT ? MI_E_PROXY : MI_QUIET;
	}
	if (udp) {
		ret = mi_udp_is_query(sk, cfg, ev);
		if (ret)
			return ret;
	}
	if (mi_addr_is_loopback(&ev->dst_ip))
		return MI_E_LOOPBACK;
	ret = mi_dest_excluded(cfg, &ev->dst_ip, ev->dst_port);
	if (ret)
		return ret;
	/* Read again, not kept from above: with nothing told apart by the protocol across the
	 * exclusion loops, the verifier walks them once for TCP and UDP together. */
	udp = sending || *(volatile __u16 *)&ev->proto == MI_IPPROTO_UDP;
	/* DNS over TCP: the same exclusions, the DNS port instead of the outbound one (as the
	 * iptables mode's MI_DNS jump comes before its TCP one). */
	if (udp || ((cfg->flags & MI_CFG_DNS) && ev->dst_port == MI_DNS_PORT)) {
		kind |= MI_ORIG_DNS;
		port = cfg->dns_port;
	}
	if (udp)
		ret = mi_udp_save(sk, netns, cfg, ev);
	else
		ret = __mi_save_origin(sk, &ev->dst_ip, ev->dst_port, netns, kind, port);
	if (ret)
		return ret;
	if (kind & MI_ORIG_DNS) {
		MI_COUNT(netns, dns_redirected, 1);
		ev->kind = MI_EV_DNS;
	} else {
		MI_COUNT(netns, redirected_out, 1);
		if (!mi_addr_is_v4(&ev->dst_ip))
			MI_COUNT(netns, redirected_out6, 1);
		ev->kind = MI_EV_CONNECT_OUT;
	}
	mi_addr_localhost_like(&ev->new_ip, &ev->dst_ip);
	ev->new_port = port;
	return MI_OK;
}

/*
 * The body of connect4/6 here and of sendmsg4/6 (mi_sendmsg.c: for DNS a sendto is a connect
 * for one datagram, decided by the same __mi_decide). `v6` and `sending` are constants in
 * each program, so each keeps only its own branch and context accesses.
 * The namespace not managed is the only cost for everything else.
 */
static __always_inline int mi_addr_hook(struct bpf_sock_addr *ctx, int v6, int sending)
{
	struct mi_event ev = {};
	struct mi_config *cfg;
	struct bpf_sock *sk;
	int ret;

	if (ctx->protocol != MI_IPPROTO_TCP && ctx->protocol != MI_IPPROTO_UDP)
		return 1;
	/* One load of ctx->sk: clang would otherwise merge the loads of several branches into
	 * one through a computed context pointer, which the verifier refuses. */
	sk = ctx->sk;
	mi_barrier_var(sk);
	if (!sk)
		return 1;
	ev.netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&ev.netns);
	if (!cfg)
		return 1;
	ev.proto = ctx->protocol;
	mi_task_ids(&ev);
	ev.dst_port = mi_ntohs(ctx->user_port);
	if (v6)
		MI_ADDR_V6(&ev.dst_ip, ctx->user_ip6);
	else
		MI_ADDR_V4(&ev.dst_ip, ctx->user_ip4);
	ret = __mi_decide(ctx, sk, ev.netns, cfg, &ev, sending);
	/* The DNS sidecar's question only reads: its connect goes where it was going. */
	if (ret == MI_OK && ev.kind != MI_EV_DNS_ASKED)
		mi_ctx_set(ctx, v6, &ev.new_ip, ev.new_port);
	if (ret == MI_QUIET)
		return 1;
	if (ret) {
		/* UDP here is always a query to port 53 */
		ev.kind = ev.proto == MI_IPPROTO_UDP || ev.dst_port == MI_DNS_PORT ? MI_EV_DNS_SKIP : MI_EV_CONNECT_SKIP;
		ev.reason = ret;
		MI_DEBUG(cfg, "connect skip uid=%u dport=%u reason=%d", ev.uid, ev.dst_port, ret);
	} else {
		MI_DEBUG(cfg, "connect dport=%u -> port %u kind=%u", ev.dst_port, ev.new_port, ev.kind);
	}
	mi_emit(cfg, &ev);
	return 1;
}

int mi_connect4(struct bpf_sock_addr *ctx)
{
	return mi_addr_hook(ctx, 0, 0);
}

int mi_connect6(struct bpf_sock_addr *ctx)
{
	return mi_addr_hook(ctx, 1, 0);
}
