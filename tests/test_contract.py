"""The backend contract suite (meshintercept.lab.contract) for every backend x sidecar.

A class whose mode cannot load or run here is skipped with the backend's own reason.
--accelerate (sockhash + sk_msg redirect) must pass the same contract with both sidecars
as without acceleration: the event-driven project sidecar and HAProxy.
"""

import pytest

from meshintercept.lab.contract import BackendContract

pytestmark = pytest.mark.root

#: (class name part, mode, spec defaults); each runs with every sidecar below. The ebpf mode
#: runs on both inbound paths: sk_lookup (the default) and the seed's tc path.
BACKENDS = [("Iptables", "iptables", {}), ("Ebpf", "ebpf", {}), ("EbpfAccelerated", "ebpf", {"accelerate": True}),
            ("EbpfTc", "ebpf", {"inbound_path": "tc"}),
            ("EbpfTcAccelerated", "ebpf", {"inbound_path": "tc", "accelerate": True})]
SIDECARS = [("ProjectSidecar", "project"), ("Haproxy", "haproxy")]

for _label, _mode, _base in BACKENDS:
    for _side_label, _kind in SIDECARS:
        _name = f"Test{_label}With{_side_label}"
        _cls = type(_name, (BackendContract,), {"mode": _mode, "sidecar_kind": _kind, "base_spec": dict(_base),
                                                "__module__": __name__, "__qualname__": _name})
        globals()[_name] = pytest.mark.ebpf(_cls) if _mode == "ebpf" else _cls
