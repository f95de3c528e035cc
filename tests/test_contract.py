"""The backend contract suite (meshintercept.testing.contract) for every backend x sidecar.

A class whose mode cannot load or run here is skipped with the backend's own reason.
"""

import pytest

from meshintercept.testing.contract import BackendContract

pytestmark = pytest.mark.root


class TestIptablesWithProjectSidecar(BackendContract):
    mode = "iptables"
    sidecar_kind = "project"


class TestIptablesWithHaproxy(BackendContract):
    mode = "iptables"
    sidecar_kind = "haproxy"


@pytest.mark.ebpf
class TestEbpfWithProjectSidecar(BackendContract):
    mode = "ebpf"
    sidecar_kind = "project"


@pytest.mark.ebpf
class TestEbpfWithHaproxy(BackendContract):
    mode = "ebpf"
    sidecar_kind = "haproxy"
