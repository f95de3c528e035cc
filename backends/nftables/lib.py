"""libnftables through Debian's ``python3-nftables`` (its JSON API), and what its failures mean.

Why this binding: it is the nft userspace itself (the library ``nft`` is a thin shell
around), so a JSON batch is parsed, cached and committed exactly as ``nft -f`` would, in one
netlink transaction, and what it prints is what an operator sees. docs/nftables.md compares
it with pyroute2's nftables module.

Two properties shape this module:

* ``Nftables()`` opens its netlink socket at construction, in the caller's namespace, so a
  context is only ever made inside a forked child that has entered the pod's namespace.
* When that socket cannot be opened (a kernel without nfnetlink) libnftables prints a line
  and calls ``exit()``: the child would die without a word. `session` opens a netfilter
  netlink socket itself first and turns a refusal into one sentence.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import re
import socket
from typing import Dict, List, Optional, Tuple

from meshintercept.errors import BackendFailure, EnvironmentMissing, NotPermitted

SONAME = "libnftables.so.1"
NETLINK_NETFILTER = 12
INSTALL = "apt-get install python3-nftables (Debian/Ubuntu; dnf install python3-nftables on Fedora/RHEL)"


def missing_reason() -> Optional[str]:
    """Why libnftables or its Python binding cannot be used here (one sentence), or None."""
    try:
        import nftables
    except ImportError as exc:
        return (f"the Python binding of libnftables is not importable ({exc}); install it with {INSTALL} "
                "and make sure the venv sees the system site-packages.")
    if not hasattr(nftables, "Nftables"):
        return (f"the module 'nftables' found at {getattr(nftables, '__path__', '?')} is not python3-nftables; "
                f"install it with {INSTALL}.")
    try:
        ctypes.CDLL(SONAME)
    except OSError as exc:
        return f"libnftables, the nft userspace library, cannot be loaded ({exc}); install it with {INSTALL}."
    return None


def preload() -> None:
    """Import the binding and map the library in this process, so forked children inherit both."""
    reason = missing_reason()
    if reason:
        raise EnvironmentMissing(reason[0].upper() + reason[1:])


def check_kernel() -> None:
    """In the current namespace: can we talk nfnetlink at all? Raises one sentence if not."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise NotPermitted("opening a netfilter netlink socket was refused; run meshintercept as root "
                               "(it needs CAP_NET_ADMIN in the pod's namespace).") from None
        raise EnvironmentMissing(
            f"the kernel offers no nf_tables netlink interface ({exc.strerror}); load it with "
            "'modprobe nf_tables' or use a kernel built with CONFIG_NF_TABLES (or use --mode iptables or ebpf)."
        ) from None
    sock.close()


class Session:
    """One libnftables context in the current namespace; commands are JSON, results parsed."""

    def __init__(self):
        import nftables

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)

    def run(self, commands: List[dict]) -> dict:
        """Run a batch; raise `NftError` carrying libnftables' own error text when it fails."""
        rc, out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(err)
        return out or {}

    def list_ruleset(self) -> List[dict]:
        return self.run([{"list": {"ruleset": None}}]).get("nftables", [])

    def text(self, command: str) -> str:
        """A listing in nft's own text syntax (what ``nft list ...`` prints)."""
        self._nft.set_json_output(False)
        try:
            rc, out, err = self._nft.cmd(command)
        finally:
            self._nft.set_json_output(True)
        if rc != 0:
            raise NftError(err)
        return out


@contextlib.contextmanager
def session():
    check_kernel()
    yield Session()


class NftError(Exception):
    def __init__(self, text: str):
        self.text = text or ""
        lines = [l.strip() for l in self.text.splitlines() if "Error:" in l]
        self.reason = (lines[-1].split("Error:", 1)[1].strip() if lines else self.text.strip()) or "no reason given"
        super().__init__(self.reason)


#: libnftables error texts (strerror of the kernel's answer) that mean the kernel lacks a part
#: of nf_tables we use: the nat chain type, the redirect expression, nfnetlink's nf_tables subsystem.
MISSING_FEATURE = ("Operation not supported", "Protocol not supported", "No such file or directory")


def failure(exc: NftError, what: str, where: str) -> Exception:
    """The one-sentence error for a refused transaction (nothing was changed: it was one batch)."""
    reason = exc.reason
    if "Operation not permitted" in reason:
        return NotPermitted(f"the kernel refused {what} in {where} ({reason}); run meshintercept as root "
                            "(CAP_NET_ADMIN in the pod's namespace).")
    if any(text in reason for text in MISSING_FEATURE):
        return EnvironmentMissing(
            f"the kernel refused {what} in {where} ({reason}): it lacks nf_tables NAT support; load "
            "'modprobe nf_tables nft_chain_nat nft_redir' or use a kernel with CONFIG_NFT_NAT and CONFIG_NFT_REDIR "
            "(nothing was changed).")
    return BackendFailure(f"the kernel refused {what} in {where} ({reason}); nothing was changed.")


@functools.lru_cache(maxsize=None)
def priority_names() -> Dict[Tuple[str, int], str]:
    """How this libnftables spells our base chains' priority when it lists them: nft 1.0.6
    (Debian 12) names -100 ``dstnat`` in prerouting only, 1.1 (Debian 13) in output too. The
    spelling is the library's, not the kernel's, so one throwaway namespace shows it; where that
    cannot be made (not root, no nf_tables) the 1.0.6 spelling stands."""
    from meshintercept.backends.nftables import ruleset as model
    from meshintercept.errors import MeshInterceptError
    from meshintercept.netns import run_forked

    try:
        return run_forked(_spelling_in_throwaway_namespace, model.NAT_PRIORITY)
    except (MeshInterceptError, OSError, NftError):
        return dict(model.PRIORITY_NAMES)


def _spelling_in_throwaway_namespace(priority: int) -> Dict[Tuple[str, int], str]:
    from meshintercept.netns import unshare_net

    unshare_net()
    hooks = ("prerouting", "output")
    with session() as nft:
        nft.run([{"add": {"table": {"family": "inet", "name": "t"}}}]
                + [{"add": {"chain": {"family": "inet", "table": "t", "name": h, "type": "nat", "hook": h,
                                      "prio": priority, "policy": "accept"}}} for h in hooks])
        text = nft.text("list table inet t")
    spelled = dict(re.findall(r"hook (\w+) priority ([^;]+);", text))
    return {(h, priority): spelled[h] for h in hooks if spelled.get(h, str(priority)) != str(priority)}

