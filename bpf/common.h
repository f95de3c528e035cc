/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every struct and map shared between the programs and user space.
 *
 * backends/ebpf/types.py mirrors the structs with ctypes; tests/test_ebpf_layout.py
 * proves both agree on sizes and offsets. Change a layout => bump MI_LAYOUT_VERSION: the
 * version is part of every map name and of the pin directory, so a node loaded by an older
 * build is detected instead of misread.
 *
 * Conventions: addresses are struct mi_addr (16 bytes, network order, IPv4 v4-mapped);
 * ports are __u16 in HOST order (each program converts at its edge, because every hook
 * context stores ports differently). Padding is explicit.
 *
 * Built with -DMI_LAYOUT_CHECK (plain clang, no bcc) only the structs are declared.
 */
#pragma once

#define MI_LAYOUT_VERSION 3

#define MI_MAX_PORTS 64 /* per port list in mi_config */
#define MI_MAX_CIDRS 32 /* excluded outbound CIDRs in mi_config, IPv4 and IPv6 together */

#define MI_MAX_NAMESPACES 4096
#define MI_MAX_POD_IPS 16384
#define MI_MAX_CONNS 65536 /* per-connection maps; LRU only as a safety net */
#define MI_EVENT_PAGES 64  /* ring buffer pages (256 KiB) */

/* mi_config.flags */
#define MI_CFG_DEBUG 0x1      /* bpf_trace_printk + ring buffer events */
#define MI_CFG_ACCELERATE 0x2 /* sockhash + sk_msg between local sockets */
#define MI_CFG_INBOUND_TC 0x4 /* inbound by tc port rewrite (the seed's path), not by sk_lookup */
#define MI_CFG_IPV4 0x8       /* intercept IPv4 (and v4-mapped destinations of IPv6 sockets) */
#define MI_CFG_IPV6 0x10      /* intercept native IPv6 */
#define MI_CFG_DNS 0x20       /* --capture-dns: the app's queries to port 53 go to dns_port */

#define MI_DNS_PORT 53 /* what --capture-dns captures (UDP and TCP) */

/* mi_origin.flags: who made the entry and where the flow stands */
#define MI_ORIG_OUTBOUND 0x1      /* app -> own sidecar (connect4/connect6) */
#define MI_ORIG_INBOUND_LOCAL 0x2 /* sidecar -> managed pod on this node (connect4, tc path) */
#define MI_ORIG_INBOUND_TC 0x4    /* cross-node inbound SYN rewritten by tc */
#define MI_ORIG_CLAIMED 0x8       /* the accepting socket owns (and will delete) it */
#define MI_ORIG_FIN_IN 0x10       /* tc saw a FIN towards the pod */
#define MI_ORIG_FIN_OUT 0x20      /* tc saw a FIN from the pod */
#define MI_ORIG_DNS 0x40          /* a DNS query sent to the DNS port (TCP connection or UDP socket) */

/* mi_sock.flags (per-socket storage) */
/* The low byte holds the MI_ORIG_OUTBOUND / MI_ORIG_INBOUND_LOCAL / MI_ORIG_DNS kind connect
 * or sendmsg chose. */
#define MI_SOCK_PENDING 0x100    /* connect saved an origin, not yet established */
#define MI_SOCK_WROTE 0x200      /* active side wrote `key` into the origin map */
#define MI_SOCK_OWNS 0x400       /* passive side claimed `key` and deletes it at close */
#define MI_SOCK_HASHED 0x800     /* in the sockhash (acceleration) */
#define MI_SOCK_MSG_REDIR 0x1000 /* sk_msg decided: redirect to the peer */
#define MI_SOCK_MSG_PASS 0x2000  /* sk_msg decided: normal path for good */
#define MI_SOCK_STEERED 0x4000   /* accepted through sk_lookup: its local address is the origin */
#define MI_SOCK_DNS_ASKED 0x8000 /* the DNS sidecar's UDP socket connected to a client: orig_* is
				  * where that client's query was going (getsockopt answers it) */

/* mi_event.kind */
#define MI_EV_CONNECT_OUT 1     /* connect4/6 rewrote to the outbound port */
#define MI_EV_CONNECT_IN 2      /* connect4/6 rewrote to a local pod's inbound port (tc path) */
#define MI_EV_CONNECT_SKIP 3    /* connect4/6 left it alone; reason says why */
#define MI_EV_ESTABLISHED 4     /* sockops moved the origin to the 4-tuple map */
#define MI_EV_CLAIMED 5         /* accepting socket took ownership */
#define MI_EV_CLOSED 6          /* an owner deleted its entry */
#define MI_EV_ORIGDST 7         /* SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST answered */
#define MI_EV_ORIGDST_MISS 8    /* asked, nothing known */
#define MI_EV_TC_SYN 9          /* tc rewrote an inbound SYN to the inbound port */
#define MI_EV_TC_END 10         /* tc removed a finished flow */
#define MI_EV_MSG_PASS 11       /* sk_msg chose the normal path for a socket */
#define MI_EV_MSG_REDIR 12      /* sk_msg chose socket-to-socket for a socket */
#define MI_EV_STEERED 13        /* sk_lookup handed a new connection to the inbound listener */
#define MI_EV_REFUSED 14        /* sk_lookup refused it: no inbound listener (fail closed) */
#define MI_EV_LISTENER 15       /* sockops registered the sidecar's inbound listener */
#define MI_EV_DNS 16            /* connect4/6 or sendmsg4/6 sent a DNS query to the DNS port */
#define MI_EV_DNS_SKIP 17       /* a query to port 53 left alone; reason says why */
#define MI_EV_DNS_RESTORED 18   /* recvmsg4/6 or getpeername4/6 showed the server asked, not the sidecar */
#define MI_EV_DNS_ASKED 19      /* the DNS sidecar's socket connected to a client took its query's origin */

/*
 * Every address is 16 bytes, network order: IPv6 as it is, IPv4 as its v4-mapped form
 * (::ffff:a.b.c.d). One key then names a connection whichever family each end's socket
 * has: an AF_INET6 dual-stack listener sees IPv4 peers as mapped addresses, an AF_INET
 * client sees the same connection in IPv4.
 */
struct mi_addr {
	__be32 w[4];
};

/* An excluded outbound range; IPv4 ones are stored mapped (prefix + 96). */
struct mi_cidr {
	struct mi_addr addr;
	struct mi_addr mask;
};

/* Per managed namespace, keyed by netns cookie. One update = one atomic spec change. */
struct mi_config {
	__u32 proxy_uid;
	__u16 outbound_port;
	__u16 inbound_port;
	__u32 flags;
	__u16 n_exclude_out_ports;
	__u16 n_exclude_in_ports;
	__u16 n_include_in_ports; /* 0 = every port */
	__u16 n_exclude_out_cidrs;
	__u16 dns_port; /* with MI_CFG_DNS */
	__u16 pad;
	__u16 exclude_out_ports[MI_MAX_PORTS];
	__u16 exclude_in_ports[MI_MAX_PORTS];
	__u16 include_in_ports[MI_MAX_PORTS];
	struct mi_cidr exclude_out_cidrs[MI_MAX_CIDRS];
};

/* A managed pod address on this node, keyed by struct mi_addr. */
struct mi_pod {
	__u64 netns;
	__u32 ifindex; /* inside the pod's namespace */
	__u32 pad;
};

/* A connection as the ACCEPTING socket sees it, in the accepting socket's namespace.
 * Also the sockhash key (then as the socket itself sees its own connection). */
struct mi_tuple {
	__u64 netns;
	struct mi_addr local_ip;
	struct mi_addr remote_ip;
	__u16 local_port;
	__u16 remote_port;
	__u32 pad;
};

/* The original destination of a connection, keyed by mi_tuple. */
struct mi_origin {
	struct mi_addr ip;
	__u16 port;
	__u16 flags;
	__u32 pad;
	__u64 src_netns; /* namespace whose socket or packet created the entry */
	__u64 gen;       /* written once per connection: an owner deletes only its own entry,
			  * never a newer connection's that reused the 4-tuple */
};

/* Per-socket storage (BPF_MAP_TYPE_SK_STORAGE): freed with the socket, so never leaks. */
struct mi_sock {
	struct mi_addr orig_ip;
	__u16 orig_port;
	__u16 flags;
	__u16 redirect_port; /* where connect/sendmsg sent it (DNS: the peer a reply comes from) */
	__u16 pad;
	__u64 key_netns;      /* namespace of the accepting side */
	__u64 gen;            /* mi_origin.gen of the entry this socket wrote or owns */
	struct mi_tuple key;  /* origin-map entry this socket wrote or owns */
	struct mi_tuple peer; /* sockhash key of the peer socket (acceleration) */
};

/* The sidecar's inbound listener of a namespace, per family (the sockhash holds the socket).
 * family 6 also serves IPv4 when the listener is dual-stack. */
struct mi_listen_key {
	__u64 netns;
	__u32 family; /* 4 or 6 */
	__u32 pad;
};

/* Per namespace, per CPU (BPF_MAP_TYPE_PERCPU_HASH keyed by netns cookie). */
struct mi_counters {
	__u64 redirected_out;
	__u64 inbound_same_node;
	__u64 inbound_cross_node;
	__u64 origdst_answers;
	__u64 origdst_misses;
	__u64 msg_redirects;
	__u64 msg_redirect_bytes;
	__u64 msg_passes;
	__u64 map_errors;
	__u64 flows_closed;
	__u64 inbound_steered; /* sk_lookup: new connections handed to the inbound listener */
	__u64 inbound_refused; /* sk_lookup: refused, no inbound listener (fail closed) */
	__u64 listeners;       /* sockops: inbound listeners registered */
	__u64 redirected_out6; /* of redirected_out: native IPv6 */
	__u64 dns_redirected;  /* DNS queries sent to the DNS port: UDP sends and connects, TCP connects */
	__u64 dns_restored;    /* replies and peers shown as the server asked (recvmsg, getpeername) */
};

/* Ring buffer record for `meshintercept trace` (only for namespaces with MI_CFG_DEBUG). */
struct mi_event {
	__u64 ts_ns;
	__u64 netns;
	__u32 kind;
	__u32 pid;
	__u32 uid;
	__s32 reason; /* 0 or the negative errno a worker returned */
	struct mi_addr src_ip;
	struct mi_addr dst_ip;
	struct mi_addr new_ip;
	__u16 src_port;
	__u16 dst_port;
	__u16 new_port;
	__u16 proto; /* 6 or 17 where it matters, else 0 */
};

/* Single-slot array written by the loader: what is loaded, by which build. */
struct mi_meta {
	__u32 layout_version;
	__u32 features; /* MI_FEAT_* */
	__u64 build_hash;
	__u64 loaded_at_ns;
};

#define MI_FEAT_ACCELERATE 0x1 /* sockhash + sk_msg loaded and attached */
#define MI_FEAT_LOOKUP 0x2     /* sk_lookup program loaded (the default inbound path) */

#ifndef MI_LAYOUT_CHECK
/* Map names carry the layout version (kernel map names are at most 15 characters). */
BPF_TABLE("hash", __u64, struct mi_config, mi3_config, MI_MAX_NAMESPACES);
BPF_TABLE("hash", struct mi_addr, struct mi_pod, mi3_podip, MI_MAX_POD_IPS);
BPF_TABLE("lru_hash", struct mi_tuple, struct mi_origin, mi3_origdst, MI_MAX_CONNS);
BPF_TABLE("percpu_hash", __u64, struct mi_counters, mi3_counters, MI_MAX_NAMESPACES);
BPF_SK_STORAGE(mi3_sock, struct mi_sock);
BPF_SOCKHASH(mi3_sockhash, struct mi_tuple, MI_MAX_CONNS);
BPF_RINGBUF_OUTPUT(mi3_events, MI_EVENT_PAGES);
BPF_ARRAY(mi3_meta, struct mi_meta, 1);

/*
 * Inbound listeners. bcc's BPF_SOCKHASH has no lookup() (sk_lookup needs one to fetch the
 * socket it hands over), so the table is declared by hand: the same map type, with the
 * method names bcc rewrites into helper calls on the map's fd.
 */
struct mi3_listen_table_t {
	struct mi_listen_key key;
	__u64 leaf; /* 8 bytes: user space writes a socket fd and reads back the socket's cookie */
	__u64 *(*lookup)(struct mi_listen_key *);
	int (*delete)(struct mi_listen_key *);
	int (*sock_hash_update)(void *, void *, __u64);
	__u32 max_entries;
};
__attribute__((section("maps/sockhash"))) struct mi3_listen_table_t mi3_listen = {.max_entries = 2 * MI_MAX_NAMESPACES};
BPF_ANNOTATE_KV_PAIR(mi3_listen, struct mi_listen_key, __u64);
#endif
