/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/recvmsg4 and cgroup/recvmsg6 (UDP only; the kernel runs them when recvfrom/recvmsg
 * asks for the source address): the reply to a captured query comes from the sidecar's DNS
 * port on loopback; the app is shown the server it asked (lib/dns.h mi_dns_show), or a
 * resolver would drop the answer.
 *
 * recvmsg6 serves every AF_INET6 socket, also for IPv4 datagrams (their source v4-mapped);
 * recvmsg4 serves AF_INET sockets. A source that is not loopback costs a few loads and a
 * compare. The programs may only return 1.
 */
#include "lib/helpers.h"
#include "lib/dns.h"

int mi_recvmsg4(struct bpf_sock_addr *ctx)
{
	return mi_dns_show(ctx, 0);
}

int mi_recvmsg6(struct bpf_sock_addr *ctx)
{
	return mi_dns_show(ctx, 1);
}
