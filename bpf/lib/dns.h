/* SPDX-License-Identifier: Apache-2.0 */
/*
 * DNS capture (--capture-dns), the parts several hooks share.
 *
 *   connect4/6 (UDP: a connected resolver socket) and sendmsg4/6 (UDP: sendto on an unconnected
 *   one) send a query to port 53 of any address but loopback to the DNS port on 127.0.0.1 /
 *   [::1] (::ffff:127.0.0.1 for an AF_INET6 socket asking a v4-mapped server) and keep where
 *   it was going in the socket's own storage (mi_udp_is_query, mi_udp_save; the decision is
 *   mi_connect.c's, shared with TCP); TCP to port 53 goes to the DNS port instead of the
 *   outbound port.
 *   recvmsg4/6 and getpeername4/6 show the server the app asked wherever the kernel would show
 *   the sidecar (mi_dns_restore).
 *   connect4/6 of the sidecar's UDP socket to a client's address answers "where was this
 *   client's query going?" (mi_dns_ask) for getsockopt.
 *
 * All of it lives in socket storage (mi3_sock): it is freed with the socket, so nothing grows
 * with the number of queries and nothing needs cleaning up (no map keyed by client).
 *
 * Pasted into the compile unit after helpers.h by the loader (bcc rewrites map calls only in
 * its main file); plain include guards for that reason.
 */
#ifndef MI_LIB_DNS_H
#define MI_LIB_DNS_H

#include "lib/helpers.h"

/*
 * The socket is connected to exactly this address and port. An AF_INET6 socket connected to
 * a v4-mapped address sends through the IPv4 path, which runs sendmsg4 with the connected
 * peer as if it were named: that is our own earlier redirect, not the app's choice.
 */
static __always_inline int mi_sk_connected_to(struct bpf_sock *sk, const struct mi_addr *ip, __u16 port)
{
	struct mi_addr peer = {};

	if (mi_ntohs((__u16)sk->dst_port) != port)
		return 0;
	if (mi_addr_is_v4(ip))
		MI_ADDR_V4(&peer, sk->dst_ip4);
	else
		MI_ADDR_V6(&peer, sk->dst_ip6);
	return mi_addr_eq(&peer, ip);
}

/*
 * UDP of the app (connect or sendto) before the rules every redirect shares: only a query to
 * port 53 under --capture-dns goes on (MI_OK). UDP to other ports is MI_QUIET, except that an
 * app talking to the DNS port on loopback itself drops the mark of an earlier capture: what it
 * receives from there from now on is not a captured reply.
 */
static __always_inline int mi_udp_is_query(struct bpf_sock *sk, const struct mi_config *cfg,
					   const struct mi_event *ev)
{
	struct mi_sock *s;

	if (ev->dst_port != MI_DNS_PORT) {
		if (ev->dst_port == cfg->dns_port && mi_addr_is_loopback(&ev->dst_ip) &&
		    !mi_sk_connected_to(sk, &ev->dst_ip, ev->dst_port)) {
			s = mi3_sock.sk_storage_get(sk, 0, 0);
			if (s)
				s->flags &= ~MI_ORIG_DNS;
		}
		return MI_QUIET;
	}
	if (!(cfg->flags & MI_CFG_DNS))
		return MI_E_NODNS;
	return MI_OK;
}

/*
 * A captured UDP query: the socket remembers where it was going. One socket, one origin: the
 * latest query's (an unconnected socket asking two servers at once sees both replies from the
 * later one; resolvers use a socket per server).
 */
static __always_inline int mi_udp_save(struct bpf_sock *sk, __u64 netns, const struct mi_config *cfg,
				       const struct mi_event *ev)
{
	struct mi_sock *s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);

	if (!s)
		return MI_E_NOMEM;
	s->orig_ip = ev->dst_ip;
	s->orig_port = ev->dst_port;
	s->redirect_port = cfg->dns_port;
	s->key_netns = netns;
	s->flags = MI_ORIG_DNS;
	return MI_OK;
}

/*
 * The DNS sidecar's question (meshintercept/dnsfwd.py): it connects a UDP socket to the
 * address a query came from, then asks getsockopt(SO_ORIGINAL_DST) on it. The socket that
 * sent the query is the one a reply from the DNS port on loopback would reach, so the kernel's
 * own UDP lookup finds it (connected sockets by their peer, unconnected ones by their port);
 * its storage holds the origin, which is copied into the sidecar socket's storage for
 * getsockopt (mi_getsockopt.c). A connect that finds no captured query (the sidecar's
 * upstream queries, a client already gone) clears an earlier answer.
 */
static __always_inline int mi_dns_ask(struct bpf_sock_addr *ctx, struct bpf_sock *sk, __u64 netns,
				      const struct mi_config *cfg, struct mi_event *ev)
{
	struct bpf_sock_tuple t = {};
	struct mi_addr orig = {};
	struct bpf_sock *app;
	struct mi_sock *s;
	__u16 orig_port = 0;

	if (!(cfg->flags & MI_CFG_DNS))
		return MI_QUIET;
	/* The tuple of a reply: from the DNS port on loopback to the client. */
	if (mi_addr_is_v4(&ev->dst_ip)) {
		t.ipv4.saddr = mi_htonl(MI_LOCALHOST);
		t.ipv4.daddr = ev->dst_ip.w[3];
		t.ipv4.sport = mi_htons(cfg->dns_port);
		t.ipv4.dport = mi_htons(ev->dst_port);
		app = bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	} else {
		t.ipv6.saddr[3] = mi_htonl(1);
		t.ipv6.daddr[0] = ev->dst_ip.w[0];
		t.ipv6.daddr[1] = ev->dst_ip.w[1];
		t.ipv6.daddr[2] = ev->dst_ip.w[2];
		t.ipv6.daddr[3] = ev->dst_ip.w[3];
		t.ipv6.sport = mi_htons(cfg->dns_port);
		t.ipv6.dport = mi_htons(ev->dst_port);
		app = bpf_sk_lookup_udp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (app) {
		s = mi3_sock.sk_storage_get(app, 0, 0);
		if (s && (s->flags & MI_ORIG_DNS) && s->key_netns == netns) {
			orig = s->orig_ip;
			orig_port = s->orig_port;
		}
		bpf_sk_release(app);
	}
	if (!orig_port) {
		s = mi3_sock.sk_storage_get(sk, 0, 0);
		if (s)
			s->flags &= ~MI_SOCK_DNS_ASKED;
		return MI_QUIET;
	}
	s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	s->orig_ip = orig;
	s->orig_port = orig_port;
	s->key_netns = netns;
	s->flags = MI_SOCK_DNS_ASKED;
	ev->kind = MI_EV_DNS_ASKED;
	ev->new_ip = orig;
	ev->new_port = orig_port;
	return MI_OK;
}

/*
 * recvmsg4/6 (the source of a datagram) and getpeername4/6 (the peer of a TCP or connected
 * UDP socket): `from` is what the kernel would show. A captured query's reply comes from the
 * DNS port on loopback; show the server the app asked instead, as conntrack's un-NAT does
 * under the NAT modes. Only for a socket whose own query was captured, only for exactly that
 * address and port, and only while its namespace captures DNS. On MI_OK ev->new_ip:new_port
 * is what to show.
 */
static __always_inline int mi_dns_restore(struct bpf_sock_addr *ctx, const struct mi_addr *from, __u16 port,
					  struct mi_event *ev)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_config *cfg;
	struct mi_addr lo = {};
	struct mi_sock *s;
	__u64 netns;

	if (!sk || !mi_addr_is_loopback(from))
		return MI_QUIET;
	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (!s || !(s->flags & MI_ORIG_DNS) || port != s->redirect_port)
		return MI_QUIET;
	mi_addr_localhost_like(&lo, &s->orig_ip);
	if (!mi_addr_eq(&lo, from))
		return MI_QUIET;
	netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&netns);
	if (!cfg || !(cfg->flags & MI_CFG_DNS))
		return MI_QUIET;
	MI_COUNT(netns, dns_restored, 1);
	ev->kind = MI_EV_DNS_RESTORED;
	ev->netns = netns;
	ev->src_ip = *from;
	ev->src_port = port;
	ev->new_ip = s->orig_ip;
	ev->new_port = s->orig_port;
	ev->proto = ctx->protocol;
	mi_task_ids(ev);
	MI_DEBUG(cfg, "dns reply from port %u shown as from port %u", port, ev->new_port);
	mi_emit(cfg, ev);
	return MI_OK;
}

/* The body of recvmsg4/6 and getpeername4/6: `v6` is a constant in each program. */
static __always_inline int mi_dns_show(struct bpf_sock_addr *ctx, int v6)
{
	struct mi_event ev = {};
	struct mi_addr from = {};

	if (v6)
		MI_ADDR_V6(&from, ctx->user_ip6);
	else
		MI_ADDR_V4(&from, ctx->user_ip4);
	/* an AF_INET socket's query went to an IPv4 server, always */
	if (mi_dns_restore(ctx, &from, mi_ntohs(ctx->user_port), &ev) == MI_OK && (v6 || mi_addr_is_v4(&ev.new_ip)))
		mi_ctx_set(ctx, v6, &ev.new_ip, ev.new_port);
	return 1;
}

#endif /* MI_LIB_DNS_H */
