"""Loading python-iptables, and the workarounds its own bugs need; each says why.

Everything else in the iptables backend talks to python-iptables through what is here
(`load`) or through its public API, so a fixed upstream release means deleting code here only.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
import sysconfig
from typing import Optional

from meshintercept.errors import EnvironmentMissing

_iptc = None


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
        return ("python-iptables is not installed; install Debian's python3-iptables (apt-get install "
                "python3-iptables) and use a venv with --system-site-packages, or pip install python-iptables "
                "with a C compiler present.")
    for lib in ("xtables", "ip4tc", "ip6tc"):
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


def load():
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
            import iptc
    except ImportError as exc:
        raise EnvironmentMissing(
            f"python-iptables is not importable ({exc}); install Debian's python3-iptables "
            "(apt-get install python3-iptables) into a venv with --system-site-packages."
        ) from None
    except Exception as exc:  # noqa: BLE001 - XTablesError, or OSError from ctypes: libraries missing
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
    The same holds for ip6tables' ``Rule6.tables``.
    """
    for rule_cls, table_cls, names_file in ((iptc.ip4tc.Rule, iptc.ip4tc.Table, "ip_tables_names"),
                                            (iptc.ip6tc.Rule6, iptc.ip6tc.Table6, "ip6_tables_names")):
        def tables(rule, table_cls=table_cls, names_file=names_file):
            return [table_cls(name) for name in table_cls.ALL if name in present_tables(names_file)]

        rule_cls.tables = property(tables)


def present_tables(names_file: str) -> set:
    """Tables this namespace has instantiated (``ip_tables_names`` / ``ip6_tables_names``)."""
    try:
        with open(f"/proc/thread-self/net/{names_file}") as f:
            return set(f.read().split())
    except OSError:  # the family's x_tables module is not loaded: no table exists yet
        return set()


_PROTOCOLS: dict = {}


def builtin_protocols() -> dict:
    """libxtables' ``xtables_chain_protos``: number -> the first name it lists for it."""
    if "builtin" not in _PROTOCOLS:
        import ctypes as ct

        class Proto(ct.Structure):
            _fields_ = [("name", ct.c_char_p), ("num", ct.c_uint8)]

        names: dict = {}
        lib = load().xtables._lib_xtables
        table = ct.cast(ct.addressof(Proto.in_dll(lib, "xtables_chain_protos")), ct.POINTER(Proto))
        i = 0
        while table[i].name:
            names.setdefault(table[i].num, table[i].name.decode())
            i += 1
        _PROTOCOLS["builtin"] = names
    return _PROTOCOLS["builtin"]


def etc_protocols() -> dict:
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




def commit(table) -> int:
    """Commit an ``iptc.Table``: 0, or the errno libiptc failed with.

    python-iptables' own ``commit`` turns the errno into libiptc's text; callers need the
    number (EAGAIN means retry, EPERM means not root), so read it where the library does.
    """
    if table._iptc.iptc_commit(table._handle) == 1:
        return 0
    return load().ip4tc._get_errno_loc()[0] or errno.EIO
