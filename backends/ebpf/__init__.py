"""The eBPF backend (installed as ``meshintercept.backends.ebpf``).

Importing this package is cheap: bcc is imported only by `loader` on a node's first
enable; everything else opens pinned objects through `meshintercept.backends.ebpf.bpfsys`.
"""

from .interceptor import EbpfInterceptor

__all__ = ["EbpfInterceptor"]
