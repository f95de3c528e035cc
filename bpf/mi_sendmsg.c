/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/sendmsg4 and cgroup/sendmsg6 (UDP only; the kernel runs them for a send that names
 * its destination, i.e. sendto/sendmsg on an unconnected socket): with --capture-dns an app's
 * query to port 53 goes to the sidecar's DNS port instead. For DNS a sendto is a connect for
 * one datagram: the body and the decision are connect4/6's (mi_connect.c mi_addr_hook); the
 * sidecar's own sends (its replies) are left alone there.
 *
 * sendmsg4 also serves an AF_INET6 socket sending to a v4-mapped address: the kernel hands
 * that send to the IPv4 path, hook included, with the plain IPv4 address.
 * Sends on a connected socket without an address never come here; connect4/6 decided for them.
 * Never refuses a send.
 */
#include "lib/helpers.h"
#include "lib/dns.h"

int mi_sendmsg4(struct bpf_sock_addr *ctx)
{
	return mi_addr_hook(ctx, 0, 1);
}

int mi_sendmsg6(struct bpf_sock_addr *ctx)
{
	return mi_addr_hook(ctx, 1, 1);
}
