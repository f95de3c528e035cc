"""The verifier's view of our programs: how much work each costs it, and what a refusal says.

* Budget: every program, loaded through the loader on the running kernel, costs the verifier no
  more instructions than the budget in docs/ebpf.md ("Verifier work"). CI runs this on 6.1 and
  6.12 under qemu (.ci/kernels) as well as here.
* Refusals: programs the kernel must refuse (too complex, a helper the type may not call, a
  made-up program or attach type, no privileges) go through the same load path, and the sentence
  names what it was. Verifier logs captured from real kernels (tests/verifier_logs/) are parsed
  the same way.
* Below the floor: `enable` works or refuses in one sentence and leaves nothing loaded.
"""

import errno
import os
import re
import subprocess
import sys

import pytest

from meshintercept.errors import ModeUnavailable
from meshintercept.manager import Manager
from meshintercept.spec import InterceptSpec

from meshintercept.backends.ebpf import bpfsys, loader, verifier
from meshintercept.backends.ebpf.pins import CGROUP_LINKS, PROGRAMS
from meshintercept.backends.ebpf.verifier import ProgramRefused, Refusal

HERE = os.path.dirname(os.path.abspath(__file__))
DOCS = os.path.join(HERE, "..", "docs", "ebpf.md")
LOGS = os.path.join(HERE, "verifier_logs")
IS_ROOT = os.geteuid() == 0


def budgets():
    """program -> budget from the 'Verifier work' table of docs/ebpf.md."""
    with open(DOCS) as f:
        text = f.read().split("## Verifier work", 1)[1]
    rows = [ln for ln in text.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    column = header.index("budget")
    found = {}
    for row in rows[1:]:
        cells = [c.strip().strip("`") for c in row.strip("|").split("|")]
        if cells[0] in PROGRAMS:
            found[cells[0]] = int(cells[column].replace(",", ""))
    return found


def compile_text(text: str):
    from bcc import BPF

    from meshintercept.backends.ebpf import kheaders

    kheaders.ensure()
    return BPF(text=text.encode(), cflags=list(loader.CFLAGS))


def refused_as_tc(text: str, name: str) -> ProgramRefused:
    """Load ``mi_test_NAME`` of ``text`` as a tc program, expecting the refusal it raises."""
    bpf = compile_text(text)
    try:
        with pytest.raises(ProgramRefused) as caught:
            verifier.load(bpf, name, f"mi_test_{name}", bpfsys.BPF_PROG_TYPE_SCHED_CLS)
    finally:
        bpf.cleanup()
    return caught.value


def read_log(name: str) -> str:
    with open(os.path.join(LOGS, name)) as f:
        return f.read()


# --- budget on the running kernel --------------------------------------------------------
def test_docs_give_every_program_a_budget():
    assert set(budgets()) == set(PROGRAMS)


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_every_program_stays_within_its_verifier_budget_on_this_kernel():
    limits = budgets()
    bpf = loader.compile_programs()
    try:
        used = {}
        for name in PROGRAMS:
            try:
                used[name] = loader.load_program(bpf, name).insns
            except ProgramRefused as exc:
                if exc.refusal.missing:  # below the floor: the refusal is tested below
                    continue
                raise
    finally:
        bpf.cleanup()
    print(f"verifier work on {os.uname().release}:", used)
    over = {n: (used[n], limits[n]) for n in used if used[n] is None or used[n] > limits[n]}
    assert not over, f"programs over their budget (processed, budget) on {os.uname().release}: {over}"


# --- refusals through the real load path -------------------------------------------------
TOO_COMPLEX = r"""
int mi_test_too_complex(struct __sk_buff *skb)
{
	__u32 n = skb->len, acc = 0;

	/* An exit test against an unknown length, once per iteration: the verifier must keep one
	 * pending branch per iteration, as it did for the old mi_port_in() on 6.1. */
	for (__u32 i = 0; i < 1000000; i++) {
		__u32 idx = i;

		asm volatile("" : "+r"(idx));
		if (idx == n)
			break;
		acc += idx ^ skb->mark;
	}
	return acc & 1;
}
"""

WRONG_HELPER = r"""
int mi_test_wrong_helper(struct __sk_buff *skb)
{
	/* A sockops-only helper in a tc program. */
	return bpf_sock_ops_cb_flags_set((void *)skb, 0) & 1;
}
"""

TRIVIAL = r"""
int mi_test_trivial(struct bpf_sock_addr *ctx)
{
	return 1;
}
"""


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_a_too_complex_program_is_named_with_the_instruction_count():
    caught = refused_as_tc(TOO_COMPLEX, "too_complex")
    refusal = caught.refusal
    assert refusal.kind == "complexity", (refusal, refusal.log[-2000:])
    assert refusal.insns and refusal.insns > 1000
    message = caught.message
    assert message.startswith("program too_complex is too complex for this kernel's verifier (")
    assert f"{refusal.insns} instructions processed" in message
    assert "Bad address" not in message


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_a_helper_the_program_type_may_not_call_is_named():
    caught = refused_as_tc(WRONG_HELPER, "wrong_helper")
    refusal = caught.refusal
    assert refusal.kind == "helper", (refusal, refusal.log)
    assert refusal.feature == "bpf_sock_ops_cb_flags_set() in sched_cls (tc) programs"
    assert "has no bpf_sock_ops_cb_flags_set() in sched_cls (tc) programs" in caught.message
    assert isinstance(refusal.error(), ModeUnavailable)


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_an_unknown_attach_type_and_program_type_are_named():
    bpf = compile_text(TRIVIAL)
    try:
        with pytest.raises(ProgramRefused) as attach:
            verifier.load(bpf, "trivial", "mi_test_trivial", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, 250)
        with pytest.raises(ProgramRefused) as prog_type:
            verifier.load(bpf, "trivial", "mi_test_trivial", 250, -1)
    finally:
        bpf.cleanup()
    assert attach.value.refusal.kind == "attach type" and "attach type 250" in attach.value.message
    assert prog_type.value.refusal.kind == "program type" and "program type 250" in prog_type.value.message
    # and the probe itself agrees that real types load
    assert verifier.type_loads(bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR, bpfsys.BPF_CGROUP_INET4_CONNECT)


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_loading_without_privileges_is_a_permission_problem():
    bpf = compile_text(TRIVIAL)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody (no CAP_BPF, no CAP_SYS_ADMIN), then load
        code = 1
        try:
            os.close(read)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                verifier.load(bpf, "trivial", "mi_test_trivial", bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                              bpfsys.BPF_CGROUP_INET4_CONNECT)
                os.write(write, b"loaded")
            except ProgramRefused as exc:
                os.write(write, f"{exc.refusal.kind}|{exc.message}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    bpf.cleanup()
    kind, _, message = answer.partition("|")
    assert kind == "permission", answer
    assert "did not permit loading program trivial (EPERM" in message and "CAP_BPF" in message


# --- below the floor: works, or one sentence and nothing left ------------------------------
def _attached(cgroup: str):
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {name: bpfsys.prog_query(fd, attach) for name, (_p, attach) in CGROUP_LINKS.items()}
    finally:
        os.close(fd)


def _assert_nothing_left(node):
    assert not os.path.exists(node.node.pin_dir) or os.listdir(node.node.pin_dir) == [], os.listdir(node.node.pin_dir)
    assert _attached(node.node.cgroup) == {name: [] for name in CGROUP_LINKS}


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_a_refused_program_leaves_nothing_loaded_and_says_the_feature_once(node, monkeypatch):
    """What 5.10 does for real (no bpf_get_netns_cookie() in sockops and getsockopt), here."""
    real = loader.load_program
    missing = {"sockops": "sockops", "getsockopt": "cgroup/sockopt"}

    def like_5_10(bpf, name):
        if name in missing:
            raise ProgramRefused(Refusal(name, "helper", errno.EINVAL,
                                         f"bpf_get_netns_cookie() in {missing[name]} programs", "5.15"))
        return real(bpf, name)

    monkeypatch.setattr(loader, "load_program", like_5_10)
    pod = node.add_pod("a")
    with pytest.raises(ModeUnavailable) as caught:
        Manager(node.node).enable(pod.netns.name, "ebpf", InterceptSpec())
    message = caught.value.message
    assert message.count("bpf_get_netns_cookie()") == 1 and message.endswith(".") and "\n" not in message
    assert "in sockops and cgroup/sockopt programs (first in Linux 5.15)" in message
    assert "which programs sockops, getsockopt need" in message
    assert f"needs Linux >= {verifier.FLOOR}" in message and "--mode iptables" in message
    _assert_nothing_left(node)


@pytest.mark.ebpf
@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root to load programs")
def test_enable_on_this_kernel_works_or_refuses_in_one_sentence(node):
    """On the running kernel, through the CLI: 6.1+ works; 5.10 refuses (exit 4) and keeps nothing."""
    pod = node.add_pod("a")
    env = node.cli_env()
    tool = os.path.join(os.path.dirname(sys.executable), "meshintercept")
    proc = subprocess.run([tool, "enable", "--mode", "ebpf", "--netns", pod.netns.name], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode == 0:
        subprocess.run([tool, "disable", "--all"], capture_output=True, env=env, timeout=120, check=True)
        return
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 4 and len(lines) == 1, (proc.returncode, proc.stderr)
    assert re.search(r"has no \S+\(\) in .* programs \(first in Linux [\d.]+\)", lines[0]), lines[0]
    assert f"needs Linux >= {verifier.FLOOR}" in lines[0]
    _assert_nothing_left(node)


# --- verifier logs captured from real kernels ----------------------------------------------
def test_the_6_1_log_of_the_old_port_loop_is_a_complexity_refusal_with_its_count():
    log = read_log("6.1-connect4-old-port-loop.log")
    refusal = verifier.explain("connect4", errno.EFAULT, log, bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                               bpfsys.BPF_CGROUP_INET4_CONNECT)
    assert refusal.kind == "complexity"
    assert refusal.line == "The sequence of 8193 jumps is too complex"
    assert refusal.insns == verifier.processed_insns(log) and refusal.insns > 100000
    assert refusal.cause() == (f"program connect4 is too complex for this kernel's verifier "
                               f"(The sequence of 8193 jumps is too complex, {refusal.insns} instructions processed)")


def test_the_5_10_logs_name_the_missing_netns_cookie_helper_and_its_first_kernel():
    for program, prog_type, type_name in (("sockops", bpfsys.BPF_PROG_TYPE_SOCK_OPS, "sockops"),
                                          ("getsockopt", bpfsys.BPF_PROG_TYPE_CGROUP_SOCKOPT, "cgroup/sockopt")):
        refusal = verifier.explain(program, errno.EINVAL, read_log(f"5.10-{program}.log"), prog_type)
        assert refusal.kind == "helper", refusal
        assert refusal.feature == f"bpf_get_netns_cookie() in {type_name} programs"
        assert refusal.since == "5.15"


def test_helpers_newer_than_the_kernel_are_named_from_the_uapi_header():
    # linux-libc-dev's header, or else the kernel headers the ebpf mode compiles against
    assert verifier.helper_names()[122] == "bpf_get_netns_cookie"
    log = "invalid func unknown#122\nprocessed 3 insns (limit 1000000)\n"
    refusal = verifier.explain("connect4", errno.EINVAL, log, bpfsys.BPF_PROG_TYPE_CGROUP_SOCK_ADDR)
    assert refusal.kind == "helper" and refusal.feature == "bpf_get_netns_cookie() in cgroup/sock_addr programs"
    assert refusal.since == "5.7"


def test_both_helper_list_formats_of_the_uapi_header_are_read():
    # up to 6.1: FN(name) in order; from 6.2: FN(name, id, ##ctx) with explicit numbers
    old = "#define __BPF_FUNC_MAPPER(FN)\t\\\n\tFN(unspec),\t\\\n\tFN(map_lookup_elem),\n"
    new = ("#define ___BPF_FUNC_MAPPER(FN, ctx...)\t\\\n\tFN(unspec, 0, ##ctx)\t\\\n"
           "\tFN(map_lookup_elem, 1, ##ctx)\t\\\n\tFN(get_netns_cookie, 122, ##ctx)\n")
    assert verifier.parse_helper_names(old) == {0: "bpf_unspec", 1: "bpf_map_lookup_elem"}
    assert verifier.parse_helper_names(new)[122] == "bpf_get_netns_cookie"


def test_other_rejections_quote_the_verifier_not_the_errno():
    log = ("0: (b7) r0 = 0\n; return *(u32 *)(ctx + 200);\ninvalid bpf_context access off=200 size=4\n"
           "processed 2 insns (limit 1000000) max_states_per_insn 0 total_states 0 peak_states 0 mark_read 0\n")
    refusal = verifier.explain("tc_ingress", errno.EACCES, log, bpfsys.BPF_PROG_TYPE_SCHED_CLS)
    assert refusal.kind == "rejected"
    assert refusal.cause() == "the verifier rejected program tc_ingress (invalid bpf_context access off=200 size=4)"
    eperm = verifier.explain("tc_ingress", errno.EPERM, "", bpfsys.BPF_PROG_TYPE_SCHED_CLS)
    assert eperm.kind == "permission" and "(EPERM)" in eperm.cause()
