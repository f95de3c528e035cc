"""A CNI-managed node on the test cluster: Debian's reference plugins + meshintercept-cni.

    with TestCluster(nodes=1) as cluster:
        bed = CniTestbed(cluster, mode="iptables")
        pod, result = bed.add_pod("web")        # bridge + host-local + meshintercept-cni ADD
        bed.runtime.check(pod.container_id, pod.netns.path)
        bed.delete_pod(pod)                      # DEL through the chain, then the namespace

The node's CNI setup is made the way an operator would: a conf dir holding a bridge +
host-local conflist, then `install.install` appends our plugin and writes the executable
shim into a bin dir. The chain is read back from that conflist and run by `ChainRuntime`
from inside the node's namespace, so the bridge the reference plugin creates lives there.
Pods are `meshintercept.lab.cluster.Pod` objects, so sidecars, servers and clients of
the cluster harness work in them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from typing import Optional, Tuple

from meshintercept.cni import install
from meshintercept.cni.runtime import ChainRuntime
from meshintercept.netns import Netns
from meshintercept.lab.cluster import ClusterNode, Pod, TestCluster, sysctl

REFERENCE_PLUGINS = "/usr/lib/cni"
DEFAULT_SUBNET = "10.231.150.0/24"
NETWORK = "mi-cni-test"
CONFLIST_NAME = "10-bridge.conflist"


def bridge_conflist(bridge: str, subnet: str, data_dir: str, version: str = "1.0.0",
                    subnet6: Optional[str] = None) -> str:
    net = ipaddress.ip_network(subnet)
    gateway = str(net.network_address + 1)
    if subnet6:
        # Dual-stack: one range set per family, as kubelet's dual-stack clusters configure it.
        gateway6 = str(ipaddress.ip_network(subnet6).network_address + 1)
        ipam = (f'\t\t\t\t"ranges": [[{{"subnet": "{subnet}"}}], [{{"subnet": "{subnet6}"}}]],\n'
                f'\t\t\t\t"routes": [{{"dst": "10.231.0.0/16", "gw": "{gateway}"}}, '
                f'{{"dst": "fd00:231::/48", "gw": "{gateway6}"}}],\n')
    else:
        ipam = (f'\t\t\t\t"subnet": "{subnet}",\n'
                # Only the cluster range, via the bridge: nothing routes out of the test namespaces.
                f'\t\t\t\t"routes": [{{"dst": "10.231.0.0/16", "gw": "{gateway}"}}],\n')
    # Written by hand, the way a node's primary CNI would (tabs, key order of its own), so
    # the byte-for-byte promise of install/uninstall is tested on text json.dumps did not make.
    return (
        "{\n"
        f'\t"cniVersion": "{version}",\n'
        f'\t"name": "{NETWORK}",\n'
        '\t"plugins": [\n'
        "\t\t{\n"
        '\t\t\t"type": "bridge",\n'
        f'\t\t\t"bridge": "{bridge}",\n'
        '\t\t\t"isGateway": true,\n'
        '\t\t\t"ipMasq": false,\n'
        '\t\t\t"ipam": {\n'
        '\t\t\t\t"type": "host-local",\n'
        + ipam +
        f'\t\t\t\t"dataDir": "{data_dir}"\n'
        "\t\t\t}\n"
        "\t\t}\n"
        "\t]\n"
        "}\n"
    )


class CniTestbed:
    def __init__(self, cluster: TestCluster, mode: str = "iptables", node: int = 0, subnet: str = DEFAULT_SUBNET,
                 block: Optional[dict] = None, subnet6: Optional[str] = None, install_plugin: bool = True):
        """``subnet6`` (e.g. fd00:231:96::/64) makes the network dual-stack: every pod gets one
        address of each family from host-local. ``install_plugin=False`` leaves the conf dir
        with the bridge conflist alone, for an installer under test (the node agent image)."""
        self.cluster = cluster
        self.node: ClusterNode = cluster.nodes[node]
        self.subnet = ipaddress.ip_network(subnet)
        self.gateway = str(self.subnet.network_address + 1)
        self.subnet6 = ipaddress.ip_network(subnet6) if subnet6 else None
        self.gateway6 = str(self.subnet6.network_address + 1) if subnet6 else None
        # Interface names have 15 bytes; the cluster id's random part keeps parallel runs apart.
        self.bridge = "br-" + cluster.id.rsplit("-", 1)[1]
        self.conf_dir = os.path.join(cluster.workdir, "net.d")
        self.bin_dir = os.path.join(cluster.workdir, "bin")
        self.log_file = os.path.join(cluster.workdir, "meshintercept-cni.log")
        os.makedirs(self.conf_dir)
        self.conflist_path = os.path.join(self.conf_dir, CONFLIST_NAME)
        self.original_text = bridge_conflist(self.bridge, subnet, os.path.join(cluster.workdir, "ipam"),
                                             subnet6=subnet6)
        with open(self.conflist_path, "w") as f:
            f.write(self.original_text)
        n = self.node.node
        self.block = {"mode": mode, "cgroup": n.cgroup, "pin_dir": n.pin_dir, "state_dir": n.state_dir,
                      "log_file": self.log_file, **(block or {})}
        self.install_result = self.runtime = None
        if install_plugin:
            self.install_result = install.install(self.conf_dir, self.bin_dir, self.block, shim="local",
                                                  python=sys.executable)
            self.runtime = self.make_runtime()
        self._next = 0

    def make_runtime(self, conflist: Optional[dict] = None) -> ChainRuntime:
        if conflist is None:
            with open(self.conflist_path) as f:
                conflist = json.load(f)
        return ChainRuntime(conflist, [REFERENCE_PLUGINS, self.bin_dir], node_netns=self.node.netns.path,
                            extra_env={"MESHINTERCEPT_CNI_LOG_FILE": self.log_file})

    def new_netns(self, name: str) -> Netns:
        """An empty pod namespace (loopback only), registered with the cluster for cleanup."""
        full = f"{self.cluster.id}-{name}"
        self.cluster.adopt_netns([full])  # before creating it, so a crash still leaves it sweepable
        subprocess.run(["ip", "netns", "add", full], check=True, capture_output=True)
        subprocess.run(["ip", "-n", full, "link", "set", "lo", "up"], check=True, capture_output=True)
        netns = Netns.parse(full)
        # The bridge plugin's IPv6 address is usable at once only without duplicate address detection.
        sysctl(netns.path, {f"net.ipv6.conf.{c}.accept_dad": "0" for c in ("all", "default")})
        return netns

    def add_pod(self, name: str, args: str = "", runtime: Optional[ChainRuntime] = None,
                netns: Optional[Netns] = None) -> Tuple[Pod, dict]:
        """Create a namespace and run the chain's ADD for it as kubelet would; return the pod and result."""
        runtime = runtime or self.runtime
        netns = netns or self.new_netns(name)
        container_id = f"{self.cluster.id}-{name}-{self._next}"
        self._next += 1
        args = args or f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id}"
        result = runtime.add(container_id, netns.path, "eth0", args)
        pod = self.adopt(name, netns, result)
        pod.container_id = container_id
        pod.cni_args = args
        return pod, result

    def adopt(self, name: str, netns: Netns, result: dict) -> Pod:
        """Wrap a namespace the chain set up as a cluster Pod (for sidecars, servers, clients)."""
        addrs = [ipaddress.ip_interface(i["address"]).ip for i in result["ips"]]
        ip = next((str(a) for a in addrs if a.version == 4), None)
        ip6 = next((str(a) for a in addrs if a.version == 6), None)
        host_if = next((i["name"] for i in result["interfaces"] if not i.get("sandbox") and i["name"] != self.bridge), "")
        pod = Pod(self.cluster, self.node, name, netns, ip, host_if, ip6)
        self.node.pods.append(pod)
        self.cluster.pods[name] = pod
        return pod

    def delete_pod(self, pod: Pod, runtime: Optional[ChainRuntime] = None) -> None:
        (runtime or self.runtime).delete(pod.container_id, pod.netns.path, "eth0", pod.cni_args)

    def start_node_server(self, port: int = 8080, family: int = 4):
        """A test server in the node namespace on the bridge address (the pods' gateway)."""
        argv = self.cluster.unprivileged_argv("apps", "serve", "--name", "node", "--port", str(port),
                                              "--bind", self.gateway if family == 4 else self.gateway6)
        proc = self.node.spawn(argv, uid=1000, stdout=open(os.devnull, "wb"), stderr=open(os.devnull, "wb"))
        self.node.wait_listening(proc, [port])
        return proc

    def log(self) -> list:
        from meshintercept.cni.invocation_log import read

        return read(self.log_file)
