"""The backend contract suite (meshintercept.lab.contract) for every backend x sidecar.

A class whose mode cannot load or run here is skipped with the backend's own reason.
"""

import pytest

from meshintercept.lab.contract import BackendContract

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


# --accelerate (sockhash + sk_msg redirect) with both sidecars: the event-driven project
# sidecar and HAProxy must pass the same contract as without acceleration.
@pytest.mark.ebpf
class TestEbpfAcceleratedWithProjectSidecar(BackendContract):
    mode = "ebpf"
    sidecar_kind = "project"
    base_spec = {"accelerate": True}


@pytest.mark.ebpf
class TestEbpfAcceleratedWithHaproxy(BackendContract):
    mode = "ebpf"
    sidecar_kind = "haproxy"
    base_spec = {"accelerate": True}
