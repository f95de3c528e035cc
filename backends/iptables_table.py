"""Read and change the legacy nat table of the *current* network namespace with python-iptables.

Everything here runs inside the target namespace, in a process forked for that purpose
(`Netns.run`): libiptc caches a whole table per process, and that cache must never hold
one namespace's table while we commit into another.

Changes are made on one libiptc handle with autocommit off and committed once: the
kernel swaps the whole table in one IPT_SO_SET_REPLACE, so either everything we changed
is live or nothing is. Writers take the xtables lock, as ``iptables-legacy -w`` does.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import fcntl
import ipaddress
import os
import shlex
import sysconfig
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from meshintercept.backends import iptables_rules as model
from meshintercept.errors import BackendFailure, Conflict, EnvironmentMissing

#: How long a change waits for another iptables writer (Istio's choice: 30 s).
LOCK_TIMEOUT = 30.0
DEFAULT_LOCKFILE = "/run/xtables.lock"
#: A concurrent writer that ignores the lock makes the commit fail with EAGAIN; retry.
COMMIT_ATTEMPTS = 3

IPT_INV_VIA_IN, IPT_INV_VIA_OUT = 0x01, 0x02
IPT_INV_SRCIP, IPT_INV_DSTIP = 0x08, 0x10
IPT_INV_FRAG, IPT_INV_PROTO = 0x20, 0x40
IPT_F_FRAG = 0x01

_iptc = None


# --- loading python-iptables -------------------------------------------------------------
def xtables_libdir() -> Optional[str]:
    """Where the xtables extensions (libxt_owner.so, ...) live, or None."""
    env = os.environ.get("XTABLES_LIBDIR")
    if env:
        return env
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    candidates = [f"/usr/lib/{multiarch}/xtables" if multiarch else None,
                  "/usr/lib64/xtables", "/usr/lib/xtables", "/usr/libexec/xtables", "/lib/xtables"]
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "libxt_comment.so")):
            return path
    return None


def missing_reason() -> Optional[str]:
    """Cheap check (no import, no kernel): None when python-iptables and its libraries are there."""
    import ctypes.util
    import importlib.util

    if importlib.util.find_spec("iptc") is None:
        return "python-iptables is not installed; install it with 'pip install python-iptables'."
    for lib in ("xtables", "ip4tc"):
        if ctypes.util.find_library(lib) is None:
            return (f"the iptables library lib{lib} is not installed; install the iptables package "
                    "(apt-get install iptables).")
    if xtables_libdir() is None:
        return ("the iptables extensions (libxt_*.so) are not installed; install the iptables package "
                "(apt-get install iptables) or set XTABLES_LIBDIR to their directory.")
    return None


def _point_at_libraries() -> None:
    """Let python-iptables open its libraries by path instead of searching for them.

    Without IPTABLES_LIBDIR it calls ctypes.util.find_library for a dozen name variants of
    libxtables, libip4tc and its own libxtwrapper, and every call forks ldconfig or gcc:
    ~90 ms of each CLI run (measured by bench/, see docs/benchmarks.md).
    """
    if "IPTABLES_LIBDIR" in os.environ:
        return
    import glob
    import importlib.util

    dirs = []
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for d in ([f"/usr/lib/{multiarch}", f"/lib/{multiarch}"] if multiarch else []) + ["/usr/lib64", "/usr/lib"]:
        found = sorted(glob.glob(os.path.join(d, "libxtables.so.*[0-9]")), key=len)
        if found:
            dirs.append(d)
            # "libxtables.so.12": python-iptables then loads exactly that file, as its search would.
            os.environ.setdefault("PYTHON_IPTABLES_XTABLES_VERSION", found[0].rsplit(".so.", 1)[1].split(".")[0])
            break
    spec = importlib.util.find_spec("iptc")
    if spec and spec.origin:
        dirs.append(os.path.dirname(os.path.dirname(spec.origin)))  # libxtwrapper*.so sits beside the package
    if dirs:
        os.environ["IPTABLES_LIBDIR"] = ":".join(dirs)


@contextlib.contextmanager
def _without_setuptools_distutils():
    """python-iptables imports distutils only for a fallback path; setuptools' distutils shim
    makes that import cost ~60 ms. Import the standard library's (or none, on 3.12+) instead."""
    import sys
    import warnings

    finders = [f for f in sys.meta_path if type(f).__name__ == "DistutilsMetaFinder"]
    for finder in finders:
        sys.meta_path.remove(finder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        sys.meta_path[0:0] = finders


def load_iptc():
    """Import python-iptables, pointing it at the xtables extensions first.

    Without XTABLES_LIBDIR python-iptables runs ``ldconfig -v`` on import to guess it,
    which is slow and fails on some systems; we look in the usual places instead.
    """
    global _iptc
    if _iptc is not None:
        return _iptc
    libdir = xtables_libdir()
    if libdir:
        os.environ.setdefault("XTABLES_LIBDIR", libdir)
    _point_at_libraries()
    try:
        with _without_setuptools_distutils():
            import iptc  # noqa: F401
    except ImportError as exc:
        raise EnvironmentMissing(
            f"python-iptables is not importable ({exc}); install it with 'pip install python-iptables'."
        ) from None
    except Exception as exc:  # XTablesError, OSError from ctypes: libraries missing
        raise EnvironmentMissing(
            f"python-iptables cannot load the iptables libraries ({exc}); install the iptables package "
            "(apt-get install iptables) or set XTABLES_LIBDIR to the directory holding libxt_*.so."
        ) from None
    _only_existing_tables(iptc)
    _option_entries_of_this_libxtables(iptc)
    _iptc = iptc
    return iptc


def _option_entries_of_this_libxtables(iptc) -> None:
    """Workaround for python-iptables 1.0.1 on iptables 1.8.10 and later (its open issue #353).

    iptables 1.8.10 added a ``base`` field to ``struct xt_option_entry`` without changing the
    library's soname; python-iptables still walks option tables with the old 48-byte stride, so
    it finds only the first option of an extension (``multiport --source-ports``, never
    ``--dports``) and reads garbage past it. Debian 13 ships 1.8.11. Walk them with the stride of
    the library actually loaded; the C parser gets a pointer into the real table, as before.
    """
    import ctypes as ct

    xt = iptc.xtables
    # The same change added xtables_strtoul_base(); its presence tells the layout.
    if not hasattr(xt._lib_xtables, "xtables_strtoul_base"):
        return

    class OptionEntry(ct.Structure):
        _fields_ = list(xt.xt_option_entry._fields_) + [("base", ct.c_uint)]

    def entries(table):
        array = ct.cast(table, ct.POINTER(OptionEntry))
        i = 0
        while array[i].name:
            yield ct.cast(ct.addressof(array[i]), ct.POINTER(xt.xt_option_entry)).contents
            i += 1

    def option_lookup(self, table, name):
        return next((e for e in entries(table) if e.name == name), None)

    original_fcheck = xt.xtables._options_fcheck

    def options_fcheck(self, name, xflags, table):
        # The original stops at the first entry whose name is None: hand it a correctly read copy.
        copied = (xt.xt_option_entry * (len(list(entries(table))) + 1))(*entries(table))
        return original_fcheck(self, name, xflags, copied)

    xt.xtables._option_lookup = option_lookup
    xt.xtables._options_fcheck = options_fcheck


def _only_existing_tables(iptc) -> None:
    """Keep python-iptables from creating the filter, mangle, raw and security tables.

    To tell a jump to a user chain from a target extension, every Target it builds asks
    ``Rule.tables``, which opens *all five* legacy tables; opening a table instantiates it in
    the namespace, and from then on every packet of the pod runs through its empty hooks
    (bench/ saw ipt_do_table in pods that had only ever had our nat rules). A user chain can
    only live in a table that already exists, so looking at those alone gives the same answer.
    """
    ip4 = iptc.ip4tc

    def tables(rule):
        try:
            with open("/proc/thread-self/net/ip_tables_names") as f:
                present = set(f.read().split())
        except OSError:
            present = set()
        return [ip4.Table(name) for name in ip4.Table.ALL if name in present]

    ip4.Rule.tables = property(tables)


# --- reading -------------------------------------------------------------------------------
@dataclass
class LiveRule:
    chain: str
    #: The rule exactly as ``iptables-legacy-save`` prints it.
    line: str
    target: str
    comment: Optional[str] = None
    packets: int = 0
    bytes: int = 0

    @property
    def ours(self) -> bool:
        return self.chain in model.OWN_CHAINS or model.is_own_comment(self.comment)


@dataclass
class LiveTable:
    name: str
    exists: bool
    #: Chain names in libiptc order (built-ins first, then user chains by name).
    chains: List[str] = field(default_factory=list)
    rules: List[LiveRule] = field(default_factory=list)

    def own_chains(self) -> List[str]:
        return [c for c in self.chains if c in model.OWN_CHAINS]

    def ours(self) -> List[LiveRule]:
        return [r for r in self.rules if r.ours]

    def our_lines(self) -> List[str]:
        """Our chain declarations and rules, in iptables-save order: comparable to a plan."""
        return [model.chain_declaration(c) for c in self.own_chains()] + [r.line for r in self.ours()]

    def foreign_references(self) -> List[LiveRule]:
        """Rules we did not add that jump into our chains (they would keep our chains alive)."""
        return [r for r in self.rules if not r.ours and r.target in model.OWN_CHAINS]


def table_exists(name: str = model.TABLE) -> bool:
    """Whether the namespace has instantiated this legacy table, without instantiating it.

    Opening a table with libiptc creates it in the namespace; status and dry runs must
    change nothing, so they ask /proc first.
    """
    try:
        with open("/proc/thread-self/net/ip_tables_names") as f:
            return name in f.read().split()
    except FileNotFoundError:  # ip_tables not loaded at all
        return False


def read_table(name: str = model.TABLE) -> LiveTable:
    if not table_exists(name):
        return LiveTable(name=name, exists=False)
    iptc = load_iptc()
    table = _open(iptc, name)
    return _read(table, name)


def _open(iptc, name: str):
    try:
        table = iptc.Table(name, autocommit=False)
        table.autocommit = False
        table.refresh()
        return table
    except iptc.IPTCError as exc:
        raise EnvironmentMissing(
            f"the kernel's legacy iptables {name} table is not usable here ({_reason(exc)}); "
            f"load it with 'modprobe iptable_{name}' (kernels from 6.x need CONFIG_IP_NF_IPTABLES_LEGACY)."
        ) from None


def _read(table, name: str) -> LiveTable:
    out = LiveTable(name=name, exists=True)
    for chain in table.chains:
        out.chains.append(chain.name)
        for rule in chain.rules:
            out.rules.append(_live_rule(chain.name, rule))
    return out


def _live_rule(chain: str, rule) -> LiveRule:
    line, comment = render_rule(chain, rule)
    packets, nbytes = rule.get_counters()
    return LiveRule(chain=chain, line=line, target=rule.target.name or "", comment=comment,
                    packets=packets, bytes=nbytes)


def render_rule(chain: str, rule) -> Tuple[str, Optional[str]]:
    """One live rule as iptables-legacy-save prints it, plus its comment text.

    The match and target parts come from the extensions' own save functions (the code
    iptables-save calls), so any rule, ours or not, renders as the real tool shows it.
    """
    ip = rule.entry.ip
    parts = [f"-A {chain}"]
    for letter, text in (("s", rule.src), ("d", rule.dst)):
        addr = _render_addr(letter, text)
        if addr:
            parts.append(addr)
    for letter, iface in (("i", rule.in_interface), ("o", rule.out_interface)):
        if iface:
            inv = iface.startswith("!")
            parts.append(f"{'! ' if inv else ''}-{letter} {iface.lstrip('!')}")
    if ip.proto:
        inv = "! " if ip.invflags & IPT_INV_PROTO else ""
        parts.append(f"{inv}-p {_proto_name(ip.proto)}")
    if ip.flags & IPT_F_FRAG:
        parts.append(("! " if ip.invflags & IPT_INV_FRAG else "") + "-f")
    comment = None
    for match in rule.matches:
        saved = _saved(match, rule)
        parts.append(f"-m {match.name}{saved}")
        if match.name == "comment":
            words = shlex.split(saved)
            if len(words) >= 2 and words[0] == "--comment":
                comment = words[1]
    target = rule.target
    if target is not None and target.name:
        flag = "-g" if getattr(target, "goto", False) else "-j"
        parts.append(f"{flag} {target.name}{_saved(target, rule)}")
    return " ".join(parts), comment


def _saved(module, rule) -> str:
    try:
        buf = module._get_saved_buf(rule.get_ip())
    except Exception:  # an extension this libxtables cannot load
        return " [unsupported]"
    if not buf:
        return ""
    text = buf.decode() if isinstance(buf, bytes) else buf
    return text.rstrip("\n")


def _render_addr(letter: str, text: str) -> Optional[str]:
    inv = text.startswith("!")
    addr, _, mask = text.lstrip("!").partition("/")
    if addr == "0.0.0.0" and mask == "0.0.0.0" and not inv:
        return None
    try:
        suffix = str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
    except ValueError:  # non-contiguous mask: iptables-save prints it dotted
        suffix = mask
    return f"{'! ' if inv else ''}-{letter} {addr}/{suffix}"


def _proto_name(number: int) -> str:
    """The name iptables-save prints for a protocol number, as the loaded libxtables decides it.

    Up to iptables 1.8.9, /etc/protocols first, then the library's own table; later releases
    print only names from their own (longer) table and numbers otherwise (1.8.11: ``-p 47``
    where 1.8.9 printed ``-p gre``). The longer table is how the two are told apart.
    """
    builtin = _builtin_protocols()
    if "dccp" not in builtin.values():
        try:
            return _etc_protocols()[number]
        except KeyError:
            pass
    return builtin.get(number, str(number))


_PROTOCOLS: dict = {}


def _builtin_protocols() -> dict:
    """libxtables' ``xtables_chain_protos``: number -> the first name it lists for it."""
    if "builtin" not in _PROTOCOLS:
        import ctypes as ct

        class Proto(ct.Structure):
            _fields_ = [("name", ct.c_char_p), ("num", ct.c_uint8)]

        names: dict = {}
        lib = load_iptc().xtables._lib_xtables
        table = ct.cast(ct.addressof(Proto.in_dll(lib, "xtables_chain_protos")), ct.POINTER(Proto))
        i = 0
        while table[i].name:
            names.setdefault(table[i].num, table[i].name.decode())
            i += 1
        _PROTOCOLS["builtin"] = names
    return _PROTOCOLS["builtin"]


def _etc_protocols() -> dict:
    if "etc" not in _PROTOCOLS:
        names: dict = {}
        try:
            with open("/etc/protocols") as f:
                for line in f:
                    fields = line.split("#", 1)[0].split()
                    if len(fields) >= 2 and fields[1].isdigit():
                        names.setdefault(int(fields[1]), fields[0])
        except OSError:
            pass
        _PROTOCOLS["etc"] = names
    return _PROTOCOLS["etc"]


# --- writing -------------------------------------------------------------------------------
@contextlib.contextmanager
def xtables_lock(timeout: float = None):
    """Hold the lock iptables-legacy takes (XTABLES_LOCKFILE or /run/xtables.lock)."""
    timeout = LOCK_TIMEOUT if timeout is None else timeout
    path = os.environ.get("XTABLES_LOCKFILE") or DEFAULT_LOCKFILE
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendFailure(
                        f"another iptables process has held the xtables lock {path} for {timeout:g} s; "
                        "retry when it is done (see 'fuser -v {path}')."
                    ) from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def apply(ruleset: model.Ruleset, where: str, lock_timeout: float = None,
          observe: Optional[Callable[["LiveTable"], dict]] = None) -> dict:
    """Make our part of the nat table equal ``ruleset`` in one commit; leave the rest alone.

    ``observe(live)`` adds facts about the table as read for this commit to the summary
    (others' rules are not changed by our commit, so no second read is needed)."""
    def edit(table, live):
        summary = _reconcile(table, live, ruleset)
        if observe is not None:
            summary.update(observe(live))
        return summary

    return _change(edit, where, lock_timeout)


def remove(where: str, lock_timeout: float = None) -> dict:
    """Remove our chains and jumps in one commit; a no-op when there are none."""
    if not table_exists():
        return {"changed": False, "removed": 0}
    return _change(_strip, where, lock_timeout)


def _change(edit, where: str, lock_timeout: Optional[float]) -> dict:
    iptc = load_iptc()
    with xtables_lock(lock_timeout):
        for attempt in range(1, COMMIT_ATTEMPTS + 1):
            table = _open(iptc, model.TABLE)
            live = _read(table, model.TABLE)
            try:
                summary = edit(table, live)
            except (iptc.IPTCError, iptc.XTablesError) as exc:
                raise _build_error(exc, where) from None
            if not summary["changed"]:
                return summary
            try:
                table.commit()
            except iptc.IPTCError as exc:
                if _errno_of(exc) == errno_mod.EAGAIN and attempt < COMMIT_ATTEMPTS:
                    continue  # someone changed the table under us; start from a fresh copy
                raise _commit_error(exc, live, where) from None
            return summary
    raise AssertionError("unreachable")


def _reconcile(table, live: LiveTable, ruleset: model.Ruleset) -> dict:
    """Edit the uncommitted handle so our rules become ``ruleset``; touch nothing else.

    Rules already right stay where they are (a re-run is a true no-op, and our jumps keep
    their position among other tools' rules); only what differs is removed or added.
    """
    iptc = load_iptc()
    added = removed = 0
    existing = set(live.chains)
    for chain in ruleset.chains:
        if chain not in existing:
            table.create_chain(chain)

    # Our rules in built-in chains: keep one of each wanted line, drop the rest, add the missing.
    for builtin in model.BUILTIN_CHAINS:
        wanted = [r for r in ruleset.jumps if r.chain == builtin]
        mine = [r for r in live.rules if r.chain == builtin and r.ours]
        if [r.line for r in mine] == [r.save() for r in wanted]:
            continue
        if not wanted and not mine:
            continue
        chain = iptc.Chain(table, builtin)
        keep = {r.save() for r in wanted}
        seen = set()
        for rule in list(chain.rules):
            line, comment = render_rule(builtin, rule)
            if not model.is_own_comment(comment):
                continue
            if line in keep and line not in seen:
                seen.add(line)
                continue
            chain.delete_rule(rule)
            removed += 1
        for rule in wanted:
            if rule.save() not in seen:
                chain.append_rule(to_iptc(iptc, rule))
                added += 1

    # Our own chains: refill only those whose content differs.
    for chain_name in ruleset.chains:
        wanted = [r.save() for r in ruleset.chain_rules(chain_name)]
        have = [r.line for r in live.rules if r.chain == chain_name]
        if chain_name in existing and have == wanted:
            continue
        chain = iptc.Chain(table, chain_name)
        if have:
            chain.flush()
            removed += len(have)
        for rule in ruleset.chain_rules(chain_name):
            chain.append_rule(to_iptc(iptc, rule))
            added += 1

    # Chains of ours the ruleset no longer has (an older layout).
    stale = [c for c in live.own_chains() if c not in ruleset.chains]
    removed += _drop_chains(table, live, stale)
    created = [c for c in ruleset.chains if c not in existing]
    return {"changed": bool(added or removed or created or stale), "added": added, "removed": removed,
            "created_chains": created}


def _strip(table, live: LiveTable) -> dict:
    iptc = load_iptc()
    removed = 0
    for rule in live.rules:
        if rule.chain in model.OWN_CHAINS or not rule.ours:
            continue
        chain = iptc.Chain(table, rule.chain)
        for candidate in list(chain.rules):
            line, _ = render_rule(rule.chain, candidate)
            if line == rule.line:
                chain.delete_rule(candidate)
                removed += 1
                break
    own = live.own_chains()
    removed += _drop_chains(table, live, own)
    return {"changed": bool(removed or own), "removed": removed, "removed_chains": own}


def _drop_chains(table, live: LiveTable, chains: List[str]) -> int:
    if not chains:
        return 0
    blockers = [r for r in live.foreign_references() if r.target in chains]
    if blockers:
        raise Conflict(
            f"chain {blockers[0].target} is still used by a rule meshintercept did not add "
            f"('{blockers[0].line}' in table nat); delete that rule, then run the command again."
        )
    iptc = load_iptc()
    flushed = 0
    for name in chains:  # flush all first: our chains jump into each other
        flushed += sum(1 for r in live.rules if r.chain == name)
        iptc.Chain(table, name).flush()
    for name in chains:
        table.delete_chain(name)
    return flushed


def to_iptc(iptc, rule: model.Rule):
    """The model rule as a python-iptables rule (the same fields `Rule.save` prints)."""
    out = iptc.Rule()
    if rule.dst:
        out.dst = rule.dst
    if rule.out_iface:
        out.out_interface = rule.out_iface
    if rule.protocol:
        out.protocol = rule.protocol  # before matches/targets: their parsers check it
    for m in rule.all_matches:
        match = out.create_match(m.name)
        match.set_parameter(m.option, ("!" if m.invert else "") + m.value)
    target = out.create_target(rule.target)
    if rule.to_ports is not None:
        target.set_parameter("to-ports", str(rule.to_ports))
    return out


# --- errors --------------------------------------------------------------------------------
def _reason(exc: Exception) -> str:
    text = str(exc)
    for prefix in ("can't commit: ", "can't initialize nat: "):
        text = text.replace(prefix, "")
    if text.startswith("b'") and text.endswith("'"):
        text = text[2:-1]
    return text


def _errno_of(exc: Exception) -> Optional[int]:
    reason = _reason(exc)
    for code in (errno_mod.EAGAIN, errno_mod.EINVAL, errno_mod.ENOENT, errno_mod.EPERM):
        if os.strerror(code) in reason:
            return code
    return None


def _build_error(exc: Exception, where: str) -> Exception:
    iptc = load_iptc()
    if isinstance(exc, iptc.XTablesError):
        return EnvironmentMissing(
            f"an iptables extension could not be loaded ({exc}); install the iptables package, which ships "
            f"libxt_owner.so, libxt_comment.so, libxt_multiport.so and libxt_REDIRECT.so "
            f"(looked in {os.environ.get('XTABLES_LIBDIR', 'the default place')})."
        )
    return BackendFailure(f"building the nat rules for {where} failed ({_reason(exc)}); nothing was changed.")


def _commit_error(exc: Exception, live: LiveTable, where: str) -> Exception:
    reason = _reason(exc)
    code = _errno_of(exc)
    if code == errno_mod.EPERM:
        from meshintercept.errors import NotPermitted

        return NotPermitted(f"the kernel refused the nat table update for {where} ({reason}); run as root with CAP_NET_ADMIN.")
    hint = "the kernel log (dmesg) says why"
    refs = live.foreign_references()
    if refs:
        hint = (f"a rule meshintercept did not add jumps into its chains ('{refs[0].line}'), and the kernel "
                f"refuses REDIRECT or owner matches reached from there; delete that rule")
    return BackendFailure(f"the kernel refused the nat table update for {where} ({reason}); nothing was changed — {hint}.")
