"""The iptables mode must create the nat table only.

Every legacy table that exists in a namespace hooks every packet of it, even when empty;
python-iptables used to open all five while building a rule (found by bench/: ipt_do_table
showed in pods that had never had anything but our nat rules).
"""

import subprocess

import pytest

from meshintercept.backends.iptables import IptablesInterceptor
from meshintercept.netns import Netns
from meshintercept.node import Node
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord

pytestmark = pytest.mark.root


@pytest.fixture
def ns(node):
    return node.add_pod("t").netns


def tables(netns: Netns, names: str = "ip_tables_names") -> list:
    # the file is absent until the family's x_tables module is loaded: no table yet
    out = subprocess.run(["ip", "netns", "exec", netns.name, "cat", f"/proc/net/{names}"],
                         capture_output=True, text=True).stdout
    return sorted(out.split())


def test_enable_status_disable_create_only_the_nat_table(ns, tmp_path):
    backend = IptablesInterceptor(Node(cgroup="/nonexistent", pin_dir=str(tmp_path / "p"), state_dir=str(tmp_path / "s")))
    spec = InterceptSpec.build(exclude_outbound_ports=["22"], include_inbound_ports=["80"])
    assert tables(ns) == [] and tables(ns, "ip6_tables_names") == []
    extra = backend.enable(ns, spec)
    record = NamespaceRecord(ns.key, ns.ref, ns.path, ns.name, "iptables", spec, extra=extra)
    assert backend.inspect(record, ns)["in_place"]
    backend.disable(record, ns)
    assert tables(ns) == ["nat"] and tables(ns, "ip6_tables_names") == ["nat"]
