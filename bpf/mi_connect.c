/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/connect4 and cgroup/connect6: send a managed namespace's outbound TCP to its sidecar.
 *
 * App (not the proxy UID) -> anything not loopback/excluded: remember the original
 * destination in the socket's storage and connect to the outbound port instead: 127.0.0.1
 * for IPv4, ::ffff:127.0.0.1 for an AF_INET6 socket dialling a v4-mapped address (Java and
 * .NET do that for every IPv4 destination), [::1] for native IPv6. A v4-mapped destination
 * is IPv4 for every rule: IPv4 exclusions, 127/8 skipped, the IPv4 family switch.
 * Proxy UID -> a managed pod on this node that uses the tc inbound path (not its own): keep
 * the address, switch the port to that pod's IN port (same-node inbound). A pod on the
 * sk_lookup path steers its own inbound, so the proxy's connect is left alone.
 *
 * Never rejects a connect: every miss, error or skip lets the connection through untouched.
 */
#include "lib/helpers.h"

static __always_inline int __mi_save_origin(struct bpf_sock_addr *ctx, const struct mi_addr *ip, __u16 port,
					    __u64 key_netns, __u16 kind)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_sock *s;

	if (!sk)
		return MI_E_NOMEM;
	s = mi2_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	s->orig_ip = *ip;
	s->orig_port = port;
	s->key_netns = key_netns;
	s->flags = MI_SOCK_PENDING | kind;
	return MI_OK;
}

/* Proxy UID: only a connection to another managed tc-path pod on this node is touched. */
static __always_inline int __mi_same_node_inbound(struct bpf_sock_addr *ctx, __u64 netns, struct mi_event *ev)
{
	struct mi_pod *pod = mi2_podip.lookup(&ev->dst_ip);
	struct mi_config *dcfg;
	__u64 dst_netns;
	int ret;

	if (!pod)
		return MI_E_PROXY;
	dst_netns = pod->netns;
	if (dst_netns == netns)
		return MI_E_OWNPOD;
	dcfg = mi2_config.lookup(&dst_netns);
	if (!dcfg)
		return MI_E_PROXY;
	if (!(dcfg->flags & MI_CFG_INBOUND_TC))
		return MI_E_LOOKUP;
	if (!mi_inbound_redirected(dcfg, ev->dst_port))
		return MI_E_EXCLUDED;
	ret = __mi_save_origin(ctx, &ev->dst_ip, ev->dst_port, dst_netns, MI_ORIG_INBOUND_LOCAL);
	if (ret)
		return ret;
	MI_COUNT(dst_netns, inbound_same_node, 1);
	ev->kind = MI_EV_CONNECT_IN;
	ev->new_ip = ev->dst_ip;
	ev->new_port = dcfg->inbound_port;
	return MI_OK;
}

/* Decide for ev->dst_ip:dst_port; on MI_OK ev->new_ip:new_port is where the connect goes. */
static __always_inline int __mi_connect(struct bpf_sock_addr *ctx, __u64 netns, const struct mi_config *cfg,
					struct mi_event *ev)
{
	int ret;

	if (mi_addr_is_loopback(&ev->dst_ip))
		return MI_E_LOOPBACK;
	if (ev->uid == cfg->proxy_uid)
		return __mi_same_node_inbound(ctx, netns, ev);
	if (!mi_family_on(cfg, &ev->dst_ip))
		return MI_E_FAMILY;
	if (mi_port_in(cfg->exclude_out_ports, cfg->n_exclude_out_ports, ev->dst_port))
		return MI_E_EXCLUDED;
	if (mi_cidr_excluded(cfg, &ev->dst_ip))
		return MI_E_EXCLUDED;
	ret = __mi_save_origin(ctx, &ev->dst_ip, ev->dst_port, netns, MI_ORIG_OUTBOUND);
	if (ret)
		return ret;
	MI_COUNT(netns, redirected_out, 1);
	if (!mi_addr_is_v4(&ev->dst_ip))
		MI_COUNT(netns, redirected_out6, 1);
	ev->kind = MI_EV_CONNECT_OUT;
	mi_addr_localhost_like(&ev->new_ip, &ev->dst_ip);
	ev->new_port = cfg->outbound_port;
	return MI_OK;
}

/* Common to both hooks: NULL when the namespace is not managed (its only cost). */
static __always_inline const struct mi_config *mi_connect_begin(struct bpf_sock_addr *ctx, struct mi_event *ev)
{
	struct mi_config *cfg;
	__u64 netns;

	if (ctx->protocol != MI_IPPROTO_TCP)
		return 0;
	netns = bpf_get_netns_cookie(ctx);
	cfg = mi2_config.lookup(&netns);
	if (!cfg)
		return 0;
	ev->netns = netns;
	mi_task_ids(ev);
	ev->dst_port = mi_ntohs(ctx->user_port);
	return cfg;
}

static __always_inline void mi_connect_end(const struct mi_config *cfg, struct mi_event *ev, int ret)
{
	if (ret) {
		ev->kind = MI_EV_CONNECT_SKIP;
		ev->reason = ret;
		MI_DEBUG(cfg, "connect skip uid=%u dport=%u reason=%d", ev->uid, ev->dst_port, ret);
	} else {
		MI_DEBUG(cfg, "connect dport=%u -> port %u kind=%u", ev->dst_port, ev->new_port, ev->kind);
	}
	mi_emit(cfg, ev);
}

int mi_connect4(struct bpf_sock_addr *ctx)
{
	struct mi_event ev = {};
	const struct mi_config *cfg = mi_connect_begin(ctx, &ev);
	int ret;

	if (!cfg)
		return 1;
	MI_ADDR_V4(&ev.dst_ip, ctx->user_ip4);
	ret = __mi_connect(ctx, ev.netns, cfg, &ev);
	if (ret == MI_OK) {
		ctx->user_ip4 = ev.new_ip.w[3];
		ctx->user_port = mi_htons(ev.new_port);
	}
	mi_connect_end(cfg, &ev, ret);
	return 1;
}

int mi_connect6(struct bpf_sock_addr *ctx)
{
	struct mi_event ev = {};
	const struct mi_config *cfg = mi_connect_begin(ctx, &ev);
	int ret;

	if (!cfg)
		return 1;
	MI_ADDR_V6(&ev.dst_ip, ctx->user_ip6);
	ret = __mi_connect(ctx, ev.netns, cfg, &ev);
	if (ret == MI_OK) {
		/* The context wants one 4-byte store per word. */
		ctx->user_ip6[0] = ev.new_ip.w[0];
		ctx->user_ip6[1] = ev.new_ip.w[1];
		ctx->user_ip6[2] = ev.new_ip.w[2];
		ctx->user_ip6[3] = ev.new_ip.w[3];
		ctx->user_port = mi_htons(ev.new_port);
	}
	mi_connect_end(cfg, &ev, ret);
	return 1;
}
