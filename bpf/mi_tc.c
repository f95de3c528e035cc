/* SPDX-License-Identifier: Apache-2.0 */
/*
 * tc (clsact) on a managed pod's interface, inside its namespace: cross-node inbound.
 *
 * Ingress: a SYN to a pod IP on a redirected port gets its destination port rewritten to
 * the pod's IN port; the original port is kept in the 4-tuple map under the tuple the
 * sidecar's accepted socket will see, so SO_ORIGINAL_DST answers it. Later packets of the
 * flow get the same rewrite. Egress: replies from the IN port get the original source port
 * back. The entry goes when the flow ends: RST, or the last ACK after both FINs, or the
 * sidecar's socket closing (sockops). The namespace comes from the pod IP map, so the same
 * loaded program serves every pod and no per-attach configuration is needed.
 *
 * IPv4 only: this is the seed's path, kept as a choice (--inbound-path tc); inbound over
 * IPv6 needs the sk_lookup path, and enable refuses the tc path for a namespace whose
 * spec wants IPv6 (docs/ebpf.md).
 *
 * Never drops: every parse failure or miss returns TC_ACT_OK untouched.
 */
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>
#include "lib/helpers.h"

#define MI_ETH_HLEN 14
#define MI_TCP_FIN 0x01
#define MI_TCP_SYN 0x02
#define MI_TCP_RST 0x04
#define MI_TCP_ACK 0x10
#define MI_TCP_CSUM_OFF 16
#define MI_IP_FRAG_MASK 0x3fff /* MF flag + fragment offset */

struct mi_pkt {
	__be32 saddr;
	__be32 daddr;
	__u16 sport; /* host order */
	__u16 dport;
	__u32 l4_off;
	__u8 tcp_flags;
};

struct mi_iphdr_min {
	__u8 ver_ihl;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__be32 saddr;
	__be32 daddr;
};

static __always_inline int mi_parse(struct __sk_buff *skb, struct mi_pkt *p)
{
	struct mi_iphdr_min ip;
	__be16 ports[2];
	__u32 ihl;

	if (skb->protocol != mi_htons(ETH_P_IP))
		return MI_E_PROTO;
	if (bpf_skb_load_bytes(skb, MI_ETH_HLEN, &ip, sizeof(ip)))
		return MI_E_PROTO;
	if (ip.protocol != MI_IPPROTO_TCP || (ip.frag_off & mi_htons(MI_IP_FRAG_MASK)))
		return MI_E_PROTO;
	ihl = (ip.ver_ihl & 0x0f) * 4;
	if (ihl < sizeof(ip))
		return MI_E_PROTO;
	p->l4_off = MI_ETH_HLEN + ihl;
	if (bpf_skb_load_bytes(skb, p->l4_off, ports, sizeof(ports)))
		return MI_E_PROTO;
	if (bpf_skb_load_bytes(skb, p->l4_off + 13, &p->tcp_flags, 1))
		return MI_E_PROTO;
	p->saddr = ip.saddr;
	p->daddr = ip.daddr;
	p->sport = mi_ntohs(ports[0]);
	p->dport = mi_ntohs(ports[1]);
	return MI_OK;
}

/* Rewrite the TCP port at port_off (0 = source, 2 = destination), checksum included. */
static __always_inline int mi_set_port(struct __sk_buff *skb, struct mi_pkt *p, __u32 port_off, __u16 from,
				       __u16 to)
{
	__be16 old = mi_htons(from), new = mi_htons(to);

	if (bpf_l4_csum_replace(skb, p->l4_off + MI_TCP_CSUM_OFF, old, new, sizeof(new)))
		return MI_E_NOMEM;
	if (bpf_skb_store_bytes(skb, p->l4_off + port_off, &new, sizeof(new), 0))
		return MI_E_NOMEM;
	return MI_OK;
}

/* Track the close handshake; true when the flow is over and its entry can go. */
static __always_inline int mi_flow_done(struct mi_origin *o, __u8 flags, __u16 fin_flag)
{
	if (flags & MI_TCP_RST)
		return 1;
	if (flags & MI_TCP_FIN) {
		o->flags |= fin_flag; /* racing writers only ever add bits */
		return 0;
	}
	return (flags & MI_TCP_ACK) && (o->flags & MI_ORIG_FIN_IN) && (o->flags & MI_ORIG_FIN_OUT);
}

static __always_inline void mi_tc_event(const struct mi_config *cfg, __u32 kind, __u64 netns, struct mi_pkt *p,
					__u16 new_port)
{
	struct mi_event ev = {};

	ev.kind = kind;
	ev.netns = netns;
	mi_addr_v4(&ev.src_ip, p->saddr);
	ev.src_port = p->sport;
	mi_addr_v4(&ev.dst_ip, p->daddr);
	ev.dst_port = p->dport;
	ev.new_ip = ev.dst_ip;
	ev.new_port = new_port;
	mi_emit(cfg, &ev);
}

static __always_inline int __mi_tc_ingress(struct __sk_buff *skb)
{
	struct mi_tuple key = {};
	struct mi_origin orig = {};
	struct mi_config *cfg;
	struct mi_origin *o;
	struct mi_pod *pod;
	struct mi_pkt p = {};
	__u64 netns;
	int ret;

	ret = mi_parse(skb, &p);
	if (ret)
		return ret;
	mi_addr_v4(&key.local_ip, p.daddr);
	mi_addr_v4(&key.remote_ip, p.saddr);
	pod = mi3_podip.lookup(&key.local_ip);
	if (!pod)
		return MI_E_NOTMANAGED;
	netns = pod->netns;
	cfg = mi3_config.lookup(&netns);
	if (!cfg || !(cfg->flags & MI_CFG_INBOUND_TC))
		return MI_E_NOTMANAGED;
	if (p.dport == cfg->inbound_port)
		return MI_E_PROXY; /* already for the sidecar (same-node inbound via connect4) */
	key.netns = netns;
	key.local_port = cfg->inbound_port;
	key.remote_port = p.sport;

	if ((p.tcp_flags & (MI_TCP_SYN | MI_TCP_ACK)) == MI_TCP_SYN) {
		if (!mi_inbound_redirected(cfg, p.dport))
			return MI_E_EXCLUDED;
		orig.ip = key.local_ip;
		orig.port = p.dport;
		orig.flags = MI_ORIG_INBOUND_TC;
		orig.src_netns = netns;
		orig.gen = bpf_ktime_get_ns();
		if (mi3_origdst.update(&key, &orig)) {
			MI_COUNT(netns, map_errors, 1);
			return MI_E_NOMEM;
		}
		MI_COUNT(netns, inbound_cross_node, 1);
		MI_DEBUG(cfg, "tc SYN %pI4:%u -> port %u", &p.daddr, p.dport, cfg->inbound_port);
		mi_tc_event(cfg, MI_EV_TC_SYN, netns, &p, cfg->inbound_port);
		return mi_set_port(skb, &p, 2, p.dport, cfg->inbound_port);
	}
	o = mi3_origdst.lookup(&key);
	if (!o || !(o->flags & MI_ORIG_INBOUND_TC) || o->port != p.dport)
		return MI_E_NOTMANAGED;
	ret = mi_set_port(skb, &p, 2, p.dport, cfg->inbound_port);
	if (mi_flow_done(o, p.tcp_flags, MI_ORIG_FIN_IN)) {
		mi3_origdst.delete(&key);
		MI_COUNT(netns, flows_closed, 1);
		mi_tc_event(cfg, MI_EV_TC_END, netns, &p, cfg->inbound_port);
	}
	return ret;
}

static __always_inline int __mi_tc_egress(struct __sk_buff *skb)
{
	struct mi_tuple key = {};
	struct mi_config *cfg;
	struct mi_origin *o;
	struct mi_pod *pod;
	struct mi_pkt p = {};
	__u64 netns;
	__u16 orig_port;
	int ret;

	ret = mi_parse(skb, &p);
	if (ret)
		return ret;
	mi_addr_v4(&key.local_ip, p.saddr);
	mi_addr_v4(&key.remote_ip, p.daddr);
	pod = mi3_podip.lookup(&key.local_ip);
	if (!pod)
		return MI_E_NOTMANAGED;
	netns = pod->netns;
	cfg = mi3_config.lookup(&netns);
	if (!cfg || !(cfg->flags & MI_CFG_INBOUND_TC) || p.sport != cfg->inbound_port)
		return MI_E_NOTMANAGED;
	key.netns = netns;
	key.local_port = p.sport;
	key.remote_port = p.dport;
	o = mi3_origdst.lookup(&key);
	/* Entries from connect4 (same-node inbound) keep the IN port: the client dialled it. */
	if (!o || !(o->flags & MI_ORIG_INBOUND_TC))
		return MI_E_NOTMANAGED;
	orig_port = o->port;
	ret = mi_set_port(skb, &p, 0, p.sport, orig_port);
	if (mi_flow_done(o, p.tcp_flags, MI_ORIG_FIN_OUT)) {
		mi3_origdst.delete(&key);
		MI_COUNT(netns, flows_closed, 1);
		mi_tc_event(cfg, MI_EV_TC_END, netns, &p, orig_port);
	}
	return ret;
}

int mi_tc_ingress(struct __sk_buff *skb)
{
	__mi_tc_ingress(skb);
	return TC_ACT_OK;
}

int mi_tc_egress(struct __sk_buff *skb)
{
	__mi_tc_egress(skb);
	return TC_ACT_OK;
}
