"""Shared fixtures: the one-machine test cluster, and the sweep of leftovers.

* ``cluster``: a 2-node `TestCluster`, shared by the tests of one module (add pods with
  names unique in the module, or remove them with ``cluster.remove_pod``).
* ``make_cluster(nodes=2)``: a fresh cluster closed after the test.
* ``node``: the node of a fresh one-node cluster (add pods with ``node.add_pod(name)``).
* ``test_prefix``: ``$MESHINTERCEPT_TEST_PREFIX`` or ``mi-t``; every namespace, cgroup, pin
  dir and state dir the tests create starts with it plus a random suffix.
* marker ``root``: skipped unless running as root (the cluster fixtures skip by themselves).

Leftovers of crashed earlier runs with the same prefix are swept at session start, and
this run's at session end; a cluster whose owner process is still running is left alone.
"""

from __future__ import annotations

import os
import warnings

import pytest

from meshintercept.lab import cluster as test_cluster

IS_ROOT = os.geteuid() == 0


def pytest_configure(config):
    config.addinivalue_line("markers", "root: needs root (namespaces, cgroups, iptables, BPF); skipped otherwise")


def pytest_collection_modifyitems(config, items):
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, cgroups, iptables, BPF)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def require_root() -> None:
    if not IS_ROOT:
        pytest.skip("needs root: the test cluster creates namespaces, cgroups and veth links")


def _sweep(prefix) -> None:
    try:
        test_cluster.sweep(prefix)
    except Exception as exc:  # noqa: BLE001 - a failed sweep must not hide test results
        warnings.warn(f"sweep of lab leftovers failed: {exc}", stacklevel=2)


@pytest.fixture(scope="session")
def test_prefix() -> str:
    return test_cluster.resolve_prefix()


@pytest.fixture(scope="session", autouse=True)
def sweep_leftovers(test_prefix):
    # Every known prefix (tests, demo, benchmarks, the registry's); live clusters are left alone.
    if IS_ROOT:
        _sweep(None)
    yield
    if IS_ROOT:
        _sweep(None)


@pytest.fixture(scope="module")
def cluster(test_prefix):
    require_root()
    with test_cluster.TestCluster(nodes=2, prefix=test_prefix) as made:
        yield made


@pytest.fixture
def node(make_cluster):
    """A fresh one-node cluster's node, for node-level tests (nothing loaded in its pin dir yet)."""
    return make_cluster(nodes=1).nodes[0]


@pytest.fixture
def make_cluster(test_prefix):
    made = []

    def make(nodes: int = 2) -> test_cluster.TestCluster:
        require_root()
        c = test_cluster.TestCluster(nodes=nodes, prefix=test_prefix)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
