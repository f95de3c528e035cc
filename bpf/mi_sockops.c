/* SPDX-License-Identifier: Apache-2.0 */
/*
 * sockops: hand the original destination from the connecting socket to the 4-tuple the
 * accepting sidecar will see, make sure every entry has an owner that deletes it, and keep
 * the sk_lookup path's listener table current.
 *
 * ACTIVE_ESTABLISHED (connecting socket, origin saved by connect4/6): write
 *   origdst[{accepting netns, accepting local = our remote, accepting remote = our local}].
 * PASSIVE_ESTABLISHED (accepting socket of a managed namespace): if an entry exists for its
 *   4-tuple, claim it: from now on this socket deletes it when it closes. On the sk_lookup
 *   path a socket accepted on a redirected port of a pod address was steered to the
 *   sidecar: it is marked (MI_SOCK_STEERED) and getsockopt answers its own local address.
 * TCP_LISTEN_CB (listen() in a managed sk_lookup namespace on its inbound port): the
 *   listener joins mi3_listen, so a sidecar that starts or restarts is found with no action.
 * STATE_CB -> CLOSE: the owner deletes; the writer deletes only what nobody claimed.
 * With MI_CFG_ACCELERATE both sockets also enter the sockhash (see mi_redir.c).
 *
 * Addresses are taken in the socket's own family; an AF_INET6 socket of an IPv4 connection
 * holds them v4-mapped already, which is the form every key uses.
 */
#include "lib/helpers.h"

#define MI_TCP_CLOSE 7 /* BPF_TCP_CLOSE */

/* sock_ops stores remote_port as (be16 << 16) on little endian, local_port in host order. */
static __always_inline __u16 mi_ops_remote_port(struct bpf_sock_ops *ctx)
{
	return (__u16)mi_ntohl(ctx->remote_port);
}

static __always_inline void mi_ops_addrs(struct bpf_sock_ops *ctx, struct mi_addr *local, struct mi_addr *remote)
{
	if (ctx->family == MI_AF_INET6) {
		MI_ADDR_V6(local, ctx->local_ip6);
		MI_ADDR_V6(remote, ctx->remote_ip6);
	} else {
		MI_ADDR_V4(local, ctx->local_ip4);
		MI_ADDR_V4(remote, ctx->remote_ip4);
	}
}

static __always_inline void mi_own_tuple(struct bpf_sock_ops *ctx, __u64 netns, struct mi_tuple *t)
{
	t->netns = netns;
	mi_ops_addrs(ctx, &t->local_ip, &t->remote_ip);
	t->local_port = (__u16)ctx->local_port;
	t->remote_port = mi_ops_remote_port(ctx);
	t->pad = 0;
}

/* The peer's own key is ours seen from the other end, in the peer's namespace. */
static __always_inline void mi_mirror(struct mi_tuple *peer, const struct mi_tuple *self, __u64 peer_netns)
{
	peer->netns = peer_netns;
	peer->local_ip = self->remote_ip;
	peer->remote_ip = self->local_ip;
	peer->local_port = self->remote_port;
	peer->remote_port = self->local_port;
	peer->pad = 0;
}

static __always_inline void mi_accelerate(struct bpf_sock_ops *ctx, struct mi_sock *s, __u64 netns)
{
	struct mi_tuple self = {};
	struct mi_config *cfg = mi3_config.lookup(&netns);
	long err;

	if (!cfg || !(cfg->flags & MI_CFG_ACCELERATE))
		return;
	mi_own_tuple(ctx, netns, &self);
	/* bcc rewrites map methods only as whole statements or initialisers. */
	err = mi3_sockhash.sock_hash_update(ctx, &self, BPF_ANY);
	if (err == 0)
		s->flags |= MI_SOCK_HASHED;
}

/* The namespace of a managed, accelerated sk_lookup pod on this node at `a`, or 0. */
static __always_inline __u64 mi_accelerated_lookup_pod(const struct mi_addr *a, __u16 port)
{
	struct mi_pod *pod = mi3_podip.lookup((struct mi_addr *)a);
	struct mi_config *cfg;
	__u64 netns;

	if (!pod)
		return 0;
	netns = pod->netns;
	cfg = mi3_config.lookup(&netns);
	if (!cfg || (cfg->flags & MI_CFG_INBOUND_TC) || !(cfg->flags & MI_CFG_ACCELERATE))
		return 0;
	if (port && !mi_inbound_redirected(cfg, port))
		return 0;
	return netns;
}

/*
 * sk_lookup path, acceleration only: a socket of an accelerated pod connecting to a
 * redirected port of an accelerated sk_lookup pod on this node (the source sidecar's
 * upstream) pairs with the steered socket that will accept it. connect4/6 left it alone,
 * so it has no storage yet.
 */
static __always_inline int __mi_active_lookup_peer(struct bpf_sock_ops *ctx, struct bpf_sock *sk)
{
	struct mi_config *cfg;
	struct mi_tuple self = {};
	struct mi_sock *s;
	__u64 netns, peer_netns;

	netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&netns);
	if (!cfg || !(cfg->flags & MI_CFG_ACCELERATE))
		return MI_E_NOTMANAGED;
	mi_own_tuple(ctx, netns, &self);
	peer_netns = mi_accelerated_lookup_pod(&self.remote_ip, self.remote_port);
	if (!peer_netns || peer_netns == netns)
		return MI_E_NOTMANAGED;
	s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	mi_mirror(&s->peer, &self, peer_netns);
	s->key.netns = netns; /* counters go to this namespace; no origin entry (no OWNS/WROTE) */
	mi_accelerate(ctx, s, netns);
	return MI_OK;
}

static __always_inline int __mi_active_established(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_origin orig = {};
	struct mi_event ev = {};
	struct mi_tuple self = {};
	struct mi_sock *s;
	__u64 netns;

	if (!sk)
		return MI_E_NOTMANAGED;
	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (!s || !(s->flags & MI_SOCK_PENDING))
		return __mi_active_lookup_peer(ctx, sk);
	netns = bpf_get_netns_cookie(ctx);
	mi_own_tuple(ctx, netns, &self);
	mi_mirror(&s->key, &self, s->key_netns);
	orig.ip = s->orig_ip;
	orig.port = s->orig_port;
	orig.flags = s->flags & (MI_ORIG_OUTBOUND | MI_ORIG_INBOUND_LOCAL | MI_ORIG_DNS);
	orig.src_netns = netns;
	orig.gen = bpf_ktime_get_ns();
	s->gen = orig.gen;
	s->flags &= ~MI_SOCK_PENDING;
	if (mi3_origdst.update(&s->key, &orig)) {
		MI_COUNT(s->key_netns, map_errors, 1);
		return MI_E_NOMEM;
	}
	s->flags |= MI_SOCK_WROTE;
	/* The peer of this socket is the accepting one, keyed as it sees itself. */
	s->peer = s->key;
	bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
	mi_accelerate(ctx, s, netns);

	struct mi_config *cfg = mi3_config.lookup(&netns);
	ev.kind = MI_EV_ESTABLISHED;
	ev.netns = netns;
	ev.src_ip = self.local_ip;
	ev.src_port = self.local_port;
	ev.dst_ip = self.remote_ip;
	ev.dst_port = self.remote_port;
	ev.new_ip = orig.ip;
	ev.new_port = orig.port;
	MI_DEBUG(cfg, "established lport=%u orig port %u", ev.src_port, ev.new_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

/*
 * sk_lookup path: was this accepted connection steered? sk_lookup hands a pod address's
 * redirected port to the sidecar except over loopback, where the pod talks to itself (the
 * sidecar to its own app on the pod address): that connection's peer is the pod itself.
 */
static __always_inline int __mi_passive_steered(struct bpf_sock_ops *ctx, struct bpf_sock *sk,
						const struct mi_config *cfg, struct mi_tuple *key)
{
	struct mi_event ev = {};
	struct mi_sock *s;
	struct mi_pod *pod;
	__u64 peer_netns;

	if (cfg->flags & MI_CFG_INBOUND_TC)
		return MI_E_NOTMANAGED;
	if (!mi_family_on(cfg, &key->local_ip) || !mi_inbound_redirected(cfg, key->local_port))
		return MI_E_EXCLUDED;
	if (mi_addr_eq(&key->local_ip, &key->remote_ip))
		return MI_E_OWNPOD;
	pod = mi3_podip.lookup(&key->local_ip);
	if (!pod || pod->netns != key->netns)
		return MI_E_NOTMANAGED;
	s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	s->flags |= MI_SOCK_STEERED;
	s->key.netns = key->netns;
	if (cfg->flags & MI_CFG_ACCELERATE) {
		peer_netns = mi_accelerated_lookup_pod(&key->remote_ip, 0);
		if (peer_netns && peer_netns != key->netns) {
			mi_mirror(&s->peer, key, peer_netns);
			mi_accelerate(ctx, s, key->netns);
		}
	}
	ev.kind = MI_EV_CLAIMED;
	ev.netns = key->netns;
	ev.src_ip = key->remote_ip;
	ev.src_port = key->remote_port;
	ev.dst_ip = key->local_ip;
	ev.dst_port = key->local_port;
	ev.new_ip = key->local_ip;
	ev.new_port = key->local_port;
	MI_DEBUG(cfg, "accepted steered rport=%u port %u", key->remote_port, key->local_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

static __always_inline int __mi_passive_established(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_tuple key = {};
	struct mi_origin *orig;
	struct mi_config *cfg;
	struct mi_event ev = {};
	struct mi_sock *s;
	__u64 netns;

	netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&netns);
	if (!cfg || !sk)
		return MI_E_NOTMANAGED; /* entries are only ever keyed by managed namespaces */
	mi_own_tuple(ctx, netns, &key);
	orig = mi3_origdst.lookup(&key);
	if (!orig)
		return __mi_passive_steered(ctx, sk, cfg, &key);
	s = mi3_sock.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s)
		return MI_E_NOMEM;
	orig->flags |= MI_ORIG_CLAIMED;
	s->key = key;
	s->gen = orig->gen;
	s->flags |= MI_SOCK_OWNS;
	/* The peer is the connecting socket, in the namespace that wrote the entry. */
	mi_mirror(&s->peer, &key, orig->src_netns);
	bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
	if (!(orig->flags & MI_ORIG_INBOUND_TC))
		mi_accelerate(ctx, s, netns);

	ev.kind = MI_EV_CLAIMED;
	ev.netns = netns;
	ev.src_ip = key.remote_ip;
	ev.src_port = key.remote_port;
	ev.dst_ip = key.local_ip;
	ev.dst_port = key.local_port;
	ev.new_ip = orig->ip;
	ev.new_port = orig->port;
	MI_DEBUG(cfg, "accepted rport=%u orig port %u", key.remote_port, ev.new_port);
	mi_emit(cfg, &ev);
	return MI_OK;
}

/* The sidecar's inbound listener of an sk_lookup namespace, by family (6 = AF_INET6,
 * which also takes IPv4 unless it is v6-only: sk_lookup falls back to it). */
static __always_inline int __mi_listen(struct bpf_sock_ops *ctx)
{
	struct mi_listen_key key = {};
	struct mi_event ev = {};
	struct mi_config *cfg;
	__u64 netns;
	long err;

	netns = bpf_get_netns_cookie(ctx);
	cfg = mi3_config.lookup(&netns);
	if (!cfg || (cfg->flags & MI_CFG_INBOUND_TC) || ctx->local_port != cfg->inbound_port)
		return MI_E_NOTMANAGED;
	key.netns = netns;
	key.family = ctx->family == MI_AF_INET6 ? 6 : 4;
	err = mi3_listen.sock_hash_update(ctx, &key, BPF_ANY);
	if (err) {
		MI_COUNT(netns, map_errors, 1);
		return MI_E_NOMEM;
	}
	MI_COUNT(netns, listeners, 1);
	ev.kind = MI_EV_LISTENER;
	ev.netns = netns;
	ev.dst_port = cfg->inbound_port;
	ev.new_port = cfg->inbound_port;
	MI_DEBUG(cfg, "inbound listener on port %u (family %u)", cfg->inbound_port, key.family);
	mi_emit(cfg, &ev);
	return MI_OK;
}

static __always_inline int __mi_closed(struct bpf_sock_ops *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mi_origin *orig;
	struct mi_sock *s;

	if (!sk)
		return MI_E_NOTMANAGED;
	s = mi3_sock.sk_storage_get(sk, 0, 0);
	if (!s)
		return MI_E_NOTMANAGED;
	if (!(s->flags & (MI_SOCK_OWNS | MI_SOCK_WROTE)))
		return MI_E_NOTMANAGED;
	orig = mi3_origdst.lookup(&s->key);
	/* A newer connection may have reused the 4-tuple and replaced the entry. */
	if (!orig || orig->gen != s->gen)
		goto out;
	/* The writer deletes only what nobody accepted (refused, reset, listener elsewhere). */
	if (!(s->flags & MI_SOCK_OWNS) && (orig->flags & MI_ORIG_CLAIMED))
		goto out;
	mi3_origdst.delete(&s->key);
	MI_COUNT(s->key.netns, flows_closed, 1);
out:
	s->flags &= ~(MI_SOCK_OWNS | MI_SOCK_WROTE);
	return MI_OK;
}

int mi_sockops(struct bpf_sock_ops *ctx)
{
	if (ctx->family != MI_AF_INET && ctx->family != MI_AF_INET6)
		return 1;
	switch (ctx->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		__mi_active_established(ctx);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		__mi_passive_established(ctx);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		__mi_listen(ctx);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ctx->args[1] == MI_TCP_CLOSE)
			__mi_closed(ctx);
		break;
	}
	return 1;
}
