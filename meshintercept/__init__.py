"""meshintercept: per-network-namespace service-mesh sidecar traffic interception.

Two interchangeable backends sit behind one `Interceptor` interface:
``iptables`` (nat REDIRECT rules in the pod's namespace) and ``ebpf`` (the osm-edge /
merbridge design: cgroup connect4 + sockops + getsockopt + tc programs, pinned in bpffs).
"""

__version__ = "0.1.0"
