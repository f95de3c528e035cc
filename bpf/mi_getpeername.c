/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cgroup/getpeername4 and cgroup/getpeername6: a TCP connection or a connected UDP socket
 * whose DNS query went to the sidecar has the DNS port on loopback as its peer; getpeername()
 * shows the server the app asked (lib/dns.h mi_dns_show), as under the NAT modes.
 * getpeername6 serves every AF_INET6 socket (an IPv4 peer v4-mapped). Outbound TCP that is not
 * DNS keeps showing the outbound port, as before. The programs may only return 1.
 */
#include "lib/helpers.h"
#include "lib/dns.h"

int mi_getpeername4(struct bpf_sock_addr *ctx)
{
	return mi_dns_show(ctx, 0);
}

int mi_getpeername6(struct bpf_sock_addr *ctx)
{
	return mi_dns_show(ctx, 1);
}
