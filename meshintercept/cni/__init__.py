"""The chained CNI plugin ``meshintercept-cni`` and its node tooling (docs/cni.md).

* `plugin`: the executable's entry point (ADD/DEL/CHECK/STATUS/GC/VERSION), on top of
  `protocol` (versions, error codes), `config` (the plugin's conflist block), `kube` (pod
  selection through the Kubernetes API), `attachments` (container id -> namespace index),
  `namespaces` (shared helpers over `meshintercept.manager.Manager`) and `invocation_log`.
* `install` / `conflist`: put the plugin into a node's CNI config and take it out, byte for byte.
* `repair`: find running pods that should be intercepted and are not, and fix them.
* `cli`: the ``meshintercept cni`` command group.
* `runtime` / `testbed`: a minimal libcni-style runtime and a CNI node on the test cluster.
"""
