"""Namespace references and the node's state records."""

import os
import subprocess

import pytest

from meshintercept.errors import NamespaceNotFound, UsageError
from meshintercept.netns import Netns, current
from meshintercept.spec import InterceptSpec
from meshintercept.state import NamespaceRecord, StateStore


@pytest.fixture
def ns(node):
    return node.add_pod("u").netns.name


def test_three_ways_to_name_a_namespace(ns):
    by_name = Netns.parse(ns)
    by_path = Netns.parse(f"/var/run/netns/{ns}")
    proc = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "30"])
    try:
        # ip netns exec forks, so wait until the sleep runs inside the namespace.
        for _ in range(100):
            try:
                by_pid = Netns.parse(f"pid:{proc.pid}")
                if by_pid.key == by_name.key:
                    break
            except NamespaceNotFound:
                pass
            import time; time.sleep(0.02)
        assert by_pid.key == by_name.key == by_path.key
    finally:
        proc.kill()
        proc.wait()
    assert by_name.name == ns
    assert by_name.key != current().key


def test_cookie_differs_per_namespace_and_is_stable(ns):
    target = Netns.parse(ns)
    assert target.cookie() == target.cookie()
    assert target.cookie() != current().cookie()


def test_run_inside_sees_the_namespace(ns):
    target = Netns.parse(ns)
    inode = target.run(lambda: os.stat("/proc/self/ns/net").st_ino)
    assert inode == target.inode


def test_bad_references():
    with pytest.raises(NamespaceNotFound):
        Netns.parse("mi-u-surely-missing")
    with pytest.raises(UsageError):
        Netns.parse("pid:abc")
    with pytest.raises(UsageError):
        Netns.parse("/etc/hostname")


def test_state_store_round_trip(tmp_path):
    store = StateStore(str(tmp_path / "s"))
    rec = NamespaceRecord("4:1", "pod", "/var/run/netns/pod", "pod", "iptables", InterceptSpec(), extra={"cookie": 7})
    with store.locked():
        store.put(rec)
    assert store.get("4:1") == rec
    assert store.find("/var/run/netns/pod") == rec
    (tmp_path / "s" / "namespaces" / "junk.json").write_text("{not json")
    assert store.all() == [rec]
    assert store.delete("4:1") and not store.delete("4:1")
