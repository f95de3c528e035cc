/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/connect4: send a managed namespace's outbound TCP to its sidecar.
 *
 * App (not the proxy UID) -> anything not loopback/excluded: remember the original
 * destination in the socket's storage and connect to 127.0.0.1:OUT instead.
 * Proxy UID -> a managed pod on this node (not its own): keep the address, switch the port
 * to that pod's IN port (same-node inbound; the packet never meets the pod's tc program
 * as a redirectable port, because the IN port is never redirected).
 *
 * Never rejects a connect: every miss, error or skip lets the connection through untouched.
 */
#include "lib/helpers.h"

static __always_inline int __mi_save_origin(struct bpf_sock_addr *ctx, __be32 ip, __u16 port,
					    __u64 key_netns, __u16 kind)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_sock *s;

	if (!sk)
		return MI_E_NOMEM;
	s = mi1_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	s->orig_ip = ip;
	s->orig_port = port;
	s->key_netns = key_netns;
	s->flags = MI_SOCK_PENDING | kind;
	return MI_OK;
}

/* Proxy UID: only a connection to another managed pod on this node is touched. */
static __always_inline int __mi_same_node_inbound(struct bpf_sock_addr *ctx, __u64 netns, __be32 dst,
						  __u16 dport, struct mi_event *ev)
{
	struct mi_pod *pod = mi1_podip.lookup(&dst);
	struct mi_config *dcfg;
	__u64 dst_netns;
	int ret;

	if (!pod)
		return MI_E_PROXY;
	dst_netns = pod->netns;
	if (dst_netns == netns)
		return MI_E_OWNPOD;
	dcfg = mi1_config.lookup(&dst_netns);
	if (!dcfg)
		return MI_E_PROXY;
	if (!mi_inbound_redirected(dcfg, dport))
		return MI_E_EXCLUDED;
	ret = __mi_save_origin(ctx, dst, dport, dst_netns, MI_ORIG_INBOUND_LOCAL);
	if (ret)
		return ret;
	ctx->user_port = mi_htons(dcfg->inbound_port);
	MI_COUNT(dst_netns, inbound_same_node, 1);
	ev->kind = MI_EV_CONNECT_IN;
	ev->new_ip = dst;
	ev->new_port = dcfg->inbound_port;
	return MI_OK;
}

static __always_inline int __mi_connect4(struct bpf_sock_addr *ctx, __u64 netns, const struct mi_config *cfg,
					 struct mi_event *ev)
{
	__be32 dst = ctx->user_ip4;
	__u16 dport = mi_ntohs(ctx->user_port);
	int ret;

	ev->dst_ip = dst;
	ev->dst_port = dport;
	if (mi_is_loopback(dst))
		return MI_E_LOOPBACK;
	if (ev->uid == cfg->proxy_uid)
		return __mi_same_node_inbound(ctx, netns, dst, dport, ev);
	if (mi_port_in(cfg->exclude_out_ports, cfg->n_exclude_out_ports, dport))
		return MI_E_EXCLUDED;
	if (mi_cidr_excluded(cfg, dst))
		return MI_E_EXCLUDED;
	ret = __mi_save_origin(ctx, dst, dport, netns, MI_ORIG_OUTBOUND);
	if (ret)
		return ret;
	ctx->user_ip4 = mi_htonl(MI_LOCALHOST);
	ctx->user_port = mi_htons(cfg->outbound_port);
	MI_COUNT(netns, redirected_out, 1);
	ev->kind = MI_EV_CONNECT_OUT;
	ev->new_ip = mi_htonl(MI_LOCALHOST);
	ev->new_port = cfg->outbound_port;
	return MI_OK;
}

int mi_connect4(struct bpf_sock_addr *ctx)
{
	struct mi_event ev = {};
	struct mi_config *cfg;
	__u64 netns;
	int ret;

	if (ctx->protocol != MI_IPPROTO_TCP)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	cfg = mi1_config.lookup(&netns);
	if (!cfg)
		return 1; /* not managed: the only cost an unmanaged namespace pays */
	ev.netns = netns;
	mi_task_ids(&ev);
	ret = __mi_connect4(ctx, netns, cfg, &ev);
	if (ret) {
		ev.kind = MI_EV_CONNECT_SKIP;
		ev.reason = ret;
		MI_DEBUG(cfg, "connect4 skip uid=%u dport=%u reason=%d", ev.uid, ev.dst_port, ret);
	} else {
		MI_DEBUG(cfg, "connect4 %pI4:%u -> port %u", &ev.dst_ip, ev.dst_port, ev.new_port);
	}
	mi_emit(cfg, &ev);
	return 1;
}
