"""The backend contract suite (meshintercept.lab.contract) for every backend x sidecar x way
an app reaches its peer (IPv4, v4-mapped from an AF_INET6 socket, IPv6).

A class whose mode cannot load or run here is skipped with the backend's own reason.
--accelerate (sockhash + sk_msg redirect) must pass the same contract with both sidecars
as without acceleration: the event-driven project sidecar and HAProxy.
"""

import pytest

from meshintercept.lab.contract import BackendContract, DnsContract, DnsForwardingContract, HttpSidecarContract

pytestmark = pytest.mark.root

#: (class name part, mode, spec defaults, the ways of reaching a peer the mode intercepts). The
#: ebpf mode runs on both inbound paths: sk_lookup (the default, both families) and the seed's
#: tc path (IPv4 only: its classes intercept IPv4 and leave IPv6 alone with --family ipv4).
BACKENDS = [
    ("Iptables", "iptables", {}, ("ipv4", "v4mapped", "ipv6")),
    ("Nftables", "nftables", {}, ("ipv4", "v4mapped", "ipv6")),
    ("Ebpf", "ebpf", {}, ("ipv4", "v4mapped", "ipv6")),
    ("EbpfAccelerated", "ebpf", {"accelerate": True}, ("ipv4", "v4mapped", "ipv6")),
    ("EbpfTc", "ebpf", {"inbound_path": "tc", "families": ["ipv4"]}, ("ipv4", "v4mapped")),
    ("EbpfTcAccelerated", "ebpf", {"inbound_path": "tc", "families": ["ipv4"], "accelerate": True},
     ("ipv4", "v4mapped")),
]
#: HAProxy 2.6 reads no IPv6 original destination (it connects back to itself).
SIDECARS = [("ProjectSidecar", "project", ("ipv4", "v4mapped", "ipv6")), ("Haproxy", "haproxy", ("ipv4", "v4mapped"))]

for _label, _mode, _base, _vias in BACKENDS:
    for _side_label, _kind, _side_vias in SIDECARS:
        _name = f"Test{_label}With{_side_label}"
        _attrs = {"mode": _mode, "sidecar_kind": _kind, "base_spec": dict(_base),
                  "vias": tuple(v for v in _vias if v in _side_vias), "__module__": __name__, "__qualname__": _name}
        _cls = type(_name, (BackendContract,), _attrs)
        globals()[_name] = pytest.mark.ebpf(_cls) if _mode == "ebpf" else _cls

# squid, an HTTP proxy nobody here wrote that reads IPv6 original destinations, for every
# backend and family (HAProxy covers IPv4 with the full contract above).
for _label, _mode, _base, _vias in BACKENDS:
    _name = f"Test{_label}WithSquid"
    _cls = type(_name, (HttpSidecarContract,), {"mode": _mode, "base_spec": dict(_base), "vias": _vias,
                                                "__module__": __name__, "__qualname__": _name})
    globals()[_name] = pytest.mark.ebpf(_cls) if _mode == "ebpf" else _cls

# --capture-dns, with the project's forwarder and with Debian's dnsmasq as the pod's DNS sidecar.
for _label, _mode, _base, _vias in BACKENDS:
    for _dns in ("project", "dnsmasq"):
        _name = f"Test{_label}Dns{_dns.capitalize()}"
        _base_cls = DnsForwardingContract if _dns == "project" else DnsContract
        _cls = type(_name, (_base_cls,), {"mode": _mode, "base_spec": dict(_base), "dns_sidecar": _dns,
                                            "vias": tuple(v for v in ("ipv4", "ipv6") if v in _vias),
                                            "__module__": __name__, "__qualname__": _name})
        globals()[_name] = pytest.mark.ebpf(_cls) if _mode == "ebpf" else _cls
