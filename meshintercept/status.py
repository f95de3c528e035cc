"""Process exit codes. They are part of the CLI contract: scripts and the CNI plugin rely on them."""

from enum import IntEnum, unique


@unique
class ExitStatus(IntEnum):
    OK = 0
    #: Something failed at run time (kernel refused a program, a rule commit failed, ...).
    FAILURE = 1
    #: Bad command line or bad value (click's own usage errors use 2 as well).
    USAGE = 2
    #: Not root / missing CAP_NET_ADMIN or CAP_BPF.
    NOT_PERMITTED = 3
    #: The machine lacks something the mode needs (bcc, kernel headers, cgroup v2, bpffs, iptables).
    ENVIRONMENT = 4
    #: The network namespace named does not exist.
    NOT_FOUND = 5
    #: The namespace is managed by something that conflicts (another mode, another mesh's rules).
    CONFLICT = 6
    INTERRUPTED = 130


EXIT_CODE_HELP = """\
Exit codes:
  0    success
  1    runtime failure (the kernel, iptables or nftables refused a change; nothing is left half-applied)
  2    usage error (bad option or value)
  3    not permitted (run as root, with CAP_NET_ADMIN and CAP_BPF)
  4    environment missing (bcc, kernel headers, cgroup v2, bpffs, iptables or nftables not usable)
  5    network namespace not found
  6    conflict (namespace managed by another mode or holds another mesh's rules)
  130  interrupted (Ctrl-C)"""
