"""Turn a results JSON into the tables of docs/benchmarks.md and the data-path chart.

Only the part between the ``<!-- bench:generated -->`` markers is rewritten; the reading
written by people around it stays.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
CHART = os.path.join(ROOT, "docs", "benchmarks-datapath.png")
CONTROL_CHART = os.path.join(ROOT, "docs", "benchmarks-control.png")
BEGIN, END = "<!-- bench:generated:begin -->", "<!-- bench:generated:end -->"
MODES = ["direct", "explicit", "iptables", "nftables", "ebpf", "ebpf-tc", "ebpf-accel"]
MODE_LABEL = {"ebpf": "ebpf (sk_lookup inbound)", "ebpf-tc": "ebpf --inbound-path tc", "ebpf-accel": "ebpf --accelerate"}

TEMPLATE = f"""# Benchmarks

{BEGIN}
{END}
"""


def med(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- data path ---------------------------------------------------------------------------------
def datapath_medians(dp: Dict) -> Dict:
    """{placement: {mode: {test: {metric: median over rounds}}}}."""
    out: Dict = {}
    for s in dp.get("samples", []):
        out.setdefault(s["placement"], {}).setdefault(s["mode"], {}).setdefault(s["test"], []).append(s)
    for modes in out.values():
        for tests in modes.values():
            for test, samples in tests.items():
                tests[test] = {
                    k: med(x.get(k) for x in samples)
                    for k in ("rps", "bytes_per_s", "p50_ms", "p99_ms", "cpu_us_per_req", "cpu_s_per_gib", "errors")
                }
                tests[test]["n"] = len(samples)
    return out


def metric(m: Dict, placement: str, mode: str, test: str, key: str) -> Optional[float]:
    return m.get(placement, {}).get(mode, {}).get(test, {}).get(key)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def f_ratio(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}×"


def f_ratio3(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.3f}×"


def f_num(x: Optional[float], fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


def datapath_tables(dp: Dict) -> List[str]:
    m = datapath_medians(dp)
    lines: List[str] = []
    modes = [x for x in MODES if x in dp.get("modes", MODES)]
    for placement in dp.get("placements", ["same-node", "cross-node"]):
        if placement not in m:
            continue
        lines += [f"#### {placement}", ""]
        lines.append("| mode | keep-alive req/s | ÷ explicit | ÷ iptables | p50 ms | p99 ms | CPU µs/req "
                     "| new conn. req/s | ÷ explicit | ÷ iptables | p50 ms | p99 ms | CPU µs/req "
                     "| one stream MB/s | ÷ explicit | ÷ iptables | CPU s/GiB |")
        lines.append("|---|" + "---:|" * 17)
        for mode in modes:
            if mode not in m[placement]:
                continue
            row = [MODE_LABEL.get(mode, mode)]
            for test, key in (("keepalive", "rps"), ("close", "rps"), ("bulk", "bytes_per_s")):
                v = metric(m, placement, mode, test, key)
                scale = 1e6 if key == "bytes_per_s" else 1
                row.append(f_num(v / scale if v is not None else None))
                row.append(f_ratio(ratio(v, metric(m, placement, "explicit", test, key))))
                row.append(f_ratio(ratio(v, metric(m, placement, "iptables", test, key))))
                if test != "bulk":
                    row.append(f_num(metric(m, placement, mode, test, "p50_ms"), "{:.3f}"))
                    row.append(f_num(metric(m, placement, mode, test, "p99_ms"), "{:.2f}"))
                    row.append(f_num(metric(m, placement, mode, test, "cpu_us_per_req"), "{:.1f}"))
                else:
                    row.append(f_num(metric(m, placement, mode, test, "cpu_s_per_gib"), "{:.2f}"))
            lines.append("| " + " | ".join(row) + " |")
        errors = sum((metric(m, placement, mode, t, "errors") or 0) for mode in modes for t in ("keepalive", "close", "bulk"))
        lines += ["", f"Socket errors and non-2xx responses across these runs (median per run, summed): {errors:.0f}.", ""]
    if dp.get("unavailable"):
        lines += ["Not measured:", ""]
        lines += [f"* `{k}`: {v}" for k, v in sorted(dp["unavailable"].items())]
        lines.append("")
    return lines


def program_tables(dp: Dict) -> List[str]:
    prof = dp.get("program_profile") or {}
    lines: List[str] = []
    for mode, cases in prof.items():
        if "error" in cases:
            lines.append(f"* `{mode}`: {cases['error']}")
            continue
        lines += [f"**{MODE_LABEL.get(mode, mode)}** — eBPF program runs per request and their cost "
                  "(`kernel.bpf_stats_enabled`, one extra pass outside the measured rounds):", "",
                  "| case | program (node) | runs/req | ns/run | µs/req | share of CPU/req |", "|---|---|---:|---:|---:|---:|"]
        for case, c in cases.items():
            total = sum(r["us_per_req"] for r in c["programs"])
            for r in c["programs"]:
                lines.append(f"| {case} | {r['program']} ({r['node']}) | {r['runs_per_req']:.2f} | {r['ns_per_run']:.0f} "
                             f"| {r['us_per_req']:.2f} | |")
            share = total / c["cpu_us_per_req"] * 100 if c.get("cpu_us_per_req") else 0
            lines.append(f"| {case} | **all programs** | | | **{total:.2f}** | **{share:.1f} %** of {c['cpu_us_per_req']:.0f} µs |")
        lines.append("")
    return lines


def spread(dp: Dict, placement: str, mode: str, test: str, key: str) -> str:
    vals = [s.get(key) for s in dp.get("samples", []) if s["placement"] == placement and s["mode"] == mode
            and s["test"] == test]
    if len(vals) < 2:
        return ""
    return f" (rounds {min(vals):,.0f}–{max(vals):,.0f})"


def chart(dp: Dict, path: str = CHART) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = datapath_medians(dp)
    placements = [p for p in dp.get("placements", []) if p in m]
    if not placements:
        return None
    tests = [("keepalive", "rps", "keep-alive req/s"), ("close", "rps", "new connection per request"),
             ("bulk", "bytes_per_s", "one long stream")]
    modes = [x for x in MODES if any(x in m[p] for p in placements)]
    fig, axes = plt.subplots(1, len(placements), figsize=(6 * len(placements), 4.2), sharey=True, squeeze=False)
    colors = {"direct": "#999999", "explicit": "#4c72b0", "iptables": "#dd8452", "nftables": "#937860",
              "ebpf": "#55a868", "ebpf-tc": "#c44e52", "ebpf-accel": "#8172b3"}
    width = 0.8 / max(len(modes), 1)
    for ax, placement in zip(axes[0], placements):
        for i, mode in enumerate(modes):
            vals = []
            for test, key, _ in tests:
                vals.append(ratio(metric(m, placement, mode, test, key), metric(m, placement, "explicit", test, key)) or 0)
            xs = [t + (i - (len(modes) - 1) / 2) * width for t in range(len(tests))]
            bars = ax.bar(xs, vals, width, label=MODE_LABEL.get(mode, mode), color=colors.get(mode))
            for bar, v in zip(bars, vals):
                if v:
                    ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(tests)))
        ax.set_xticklabels([t[2] for t in tests], fontsize=9)
        ax.set_title(placement)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("throughput ÷ explicit (sidecar addressed directly)")
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("meshintercept data path: median of interleaved rounds, ratio to explicit (higher is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def control_chart(cp: Dict, path: str = CONTROL_CHART) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    backends = cp.get("backends", {})
    if not backends:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = {"iptables": "#dd8452", "nftables": "#937860", "ebpf": "#55a868"}
    tops = {}
    for mode, b in backends.items():
        for ax, key in zip(axes, ("enable", "disable")):
            pts = sorted((e["n"], e["s"] * 1000) for e in b.get(key, []) if e["via"] == "api")
            if not pts:
                continue
            # Median per bucket of 50: the line; every point: the dots.
            buckets: Dict[int, list] = {}
            for n, ms in pts:
                buckets.setdefault(n // 50, []).append(ms)
            xs = [k * 50 + 25 for k in sorted(buckets)]
            ys = [statistics.median(buckets[k]) for k in sorted(buckets)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=2, alpha=0.25, color=colors.get(mode))
            values = sorted(p[1] for p in pts)
            tops[key] = max(tops.get(key, 0), values[int(len(values) * 0.97)] * 1.3)
            ax.plot(xs, ys, color=colors.get(mode), label=f"{mode} (API, median per 50)")
            cli = [(e["n"], e["s"] * 1000) for e in b.get(key, []) if e["via"] == "cli"]
            if cli and key == "enable":
                ax.scatter([p[0] for p in cli], [p[1] / 10 for p in cli], marker="x", color=colors.get(mode),
                           label=f"{mode} (CLI, ms ÷ 10)")
    for ax, title in zip(axes, ("enable the Nth namespace", "disable the Nth namespace (N-1 stay)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("managed namespaces on the node")
        ax.set_ylabel("ms")
        ax.set_ylim(0, max(tops.get("enable" if "enable" in title else "disable", 12), 12))
        ax.grid(alpha=0.3)
        ax.axhline(10, color="black", linewidth=0.7, linestyle="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- control plane -----------------------------------------------------------------------------
def _ms(x: Optional[float]) -> str:
    return "–" if x is None else f"{x * 1000:.1f}"


def control_summary(b: Dict) -> Dict:
    def pick(items, via, lo, hi):
        return med(e["s"] for e in items if e["via"] == via and lo <= e["n"] <= hi)

    enable, disable = b.get("enable", []), b.get("disable", [])
    peak = max((e["n"] for e in enable), default=0)
    api = [(e["n"], e["s"]) for e in enable if e["via"] == "api"]
    first_hi = min(102, peak)
    return {
        "peak": peak,
        "enable_api_first100": pick(enable, "api", 0, first_hi),
        "enable_api_last100": pick(enable, "api", peak - 99, peak),
        "enable_api_all": pick(enable, "api", 0, peak),
        "enable_cli": med(e["s"] for e in enable if e["via"] == "cli"),
        "enable_cli_first": next((e["s"] for e in enable if e["via"] == "cli"), None),
        "enable_cli_last": next((e["s"] for e in reversed(enable) if e["via"] == "cli"), None),
        "disable_api_first100": pick(disable, "api", 0, first_hi),
        "disable_api_last100": pick(disable, "api", peak - 99, peak),
        "disable_api_all": pick(disable, "api", 0, peak),
        "disable_cli": med(e["s"] for e in disable if e["via"] == "cli"),
        "enable_api_slope": slope(api),
    }


def slope(points) -> Optional[float]:
    """Least-squares growth of the time per enable, in seconds per additional managed namespace."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def latency_cell(lat: Optional[Dict], test: str, key: str) -> Optional[float]:
    if not lat:
        return None
    return med(r.get(key) for r in lat.get(test, []))


def control_tables(cp: Dict) -> List[str]:
    lines = [
        f"{cp['count']} idle pod namespaces (lo + eth0 with an address) besides the client and server pods; "
        f"every {cp['cli_every']}th enable/disable goes through the CLI (a fresh `meshintercept` process), "
        "the rest through `Manager` in one process. Times are medians, in milliseconds.", "",
        "| backend | enable API, N ≤ 100 | enable API, last 100 | growth per 100 more namespaces (fit) "
        "| enable CLI (all samples) | CLI first / last sample "
        "| disable API, N ≤ 100 | disable API, last 100 | disable CLI | `status --json` CLI at peak | disable --all |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, b in cp.get("backends", {}).items():
        s = control_summary(b)
        growth = "–" if s["enable_api_slope"] is None else f"{s['enable_api_slope'] * 1e5:+.2f} ms"
        lines.append(
            f"| {mode} (peak N={s['peak']}) | {_ms(s['enable_api_first100'])} | {_ms(s['enable_api_last100'])} "
            f"| {growth} "
            f"| {_ms(s['enable_cli'])} | {_ms(s['enable_cli_first'])} / {_ms(s['enable_cli_last'])} "
            f"| {_ms(s['disable_api_first100'])} | {_ms(s['disable_api_last100'])} | {_ms(s['disable_cli'])} "
            f"| {_ms(b.get('status_cli_at_peak_s'))} | {_ms(b.get('disable_all_s'))} |"
        )
    lines += control_ratios(cp.get("backends", {}))
    lines += ["", "Request latency and rate between the client and server pods (same node, both intercepted, wrk "
              "16 connections), with 2 managed namespaces and with the peak number:", "",
              "| backend | new conn. req/s at 2 | at peak | p50 ms at 2 | at peak | keep-alive p50 ms at 2 | at peak |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, b in cp.get("backends", {}).items():
        a, p = b.get("latency_at_1"), b.get("latency_at_peak")
        lines.append(
            f"| {mode} | {f_num(latency_cell(a, 'close', 'rps'))} | {f_num(latency_cell(p, 'close', 'rps'))} "
            f"| {f_num(latency_cell(a, 'close', 'p50_ms'), '{:.3f}')} | {f_num(latency_cell(p, 'close', 'p50_ms'), '{:.3f}')} "
            f"| {f_num(latency_cell(a, 'keepalive', 'p50_ms'), '{:.3f}')} | {f_num(latency_cell(p, 'keepalive', 'p50_ms'), '{:.3f}')} |"
        )
    eb = cp.get("backends", {}).get("ebpf")
    if eb and eb.get("maps_at_peak") and "maps" in eb["maps_at_peak"]:
        lines += ["", f"Kernel memory of the eBPF maps (bpftool `bytes_memlock`, pinned maps of the node): "
                  f"{eb.get('maps_at_1', {}).get('total_bytes_memlock', 0) / 1024:,.0f} KiB with 2 namespaces, "
                  f"{eb['maps_at_peak']['total_bytes_memlock'] / 1024:,.0f} KiB with {control_summary(eb)['peak']}.", "",
                  "| map | type | max entries | key+value bytes | entries at peak | memlock KiB |", "|---|---|---:|---:|---:|---:|"]
        entries = eb.get("map_entries_at_peak", {})
        for mp in eb["maps_at_peak"]["maps"]:
            lines.append(f"| {mp['name']} | {mp['type']} | {mp['max_entries']} | "
                         f"{(mp['bytes_key'] or 0) + (mp['bytes_value'] or 0)} | {entries.get(mp['pinned'], '–')} "
                         f"| {mp['bytes_memlock'] / 1024:,.0f} |")
    for mode, b in cp.get("backends", {}).items():
        for err in b.get("errors", [])[:5]:
            lines.append(f"\n* {mode}: {err}")
    if cp.get("unavailable"):
        lines += ["", "Not measured:", ""] + [f"* `{k}`: {v}" for k, v in cp["unavailable"].items()]
    lines.append("")
    return lines


def control_ratios(backends: Dict, base: str = "iptables") -> List[str]:
    """The backends' medians divided by ``base``'s, all from the same run (below 1: faster)."""
    if base not in backends or len(backends) < 2:
        return []
    ref = control_summary(backends[base])
    keys = (("enable_api_all", "enable API (all N)"), ("enable_cli", "enable CLI"),
            ("disable_api_all", "disable API (all N)"), ("disable_cli", "disable CLI"))
    lines = ["", f"The same medians as ratios to `{base}`, side by side from this run (below 1: faster):", "",
             "| backend | " + " | ".join(label for _, label in keys) + " |", "|---|" + "---:|" * len(keys)]
    for mode, b in backends.items():
        s = control_summary(b)
        lines.append(f"| {mode} | " + " | ".join(f_ratio(ratio(s[k], ref[k])) for k, _ in keys) + " |")
    return lines


def cli_tables(cs: Dict) -> List[str]:
    lines = [f"Timed with {cs['tool']}, {cs['runs']} runs each after 3 warm-ups, against an empty node.", "",
             "| command | median ms | min ms |", "|---|---:|---:|"]
    for name, c in cs["commands"].items():
        lines.append(f"| `{name}` | {c['median_s'] * 1000:.1f} | {c['min_s'] * 1000:.1f} |")
    imports = cs.get("imports") or []
    if imports:
        lines += ["", f"Largest imports when `meshintercept.cli` loads (`python -X importtime`, cumulative, "
                  f"total {imports[0].get('total_us', 0) / 1000:.1f} ms):", "",
                  "| module | cumulative ms |", "|---|---:|"]
        lines += [f"| `{r['module']}` | {r['cumulative_us'] / 1000:.1f} |" for r in imports[1:9]]
    more = cs.get("imports_enable") or []
    if more:
        lines += ["", "What `enable` imports on top of that, per backend (the CLI imports a backend only when it is "
                  f"used; all of them here, total {more[0].get('total_us', 0) / 1000:.1f} ms in one interpreter):", "",
                  "| module | cumulative ms |", "|---|---:|"]
        lines += [f"| `{r['module']}` | {r['cumulative_us'] / 1000:.1f} |" for r in more[1:12]]
    lines.append("")
    return lines


# --- targets -------------------------------------------------------------------------------------
def targets(res: Dict) -> List[str]:
    rows = []
    dp = res.get("datapath")
    if dp:
        m = datapath_medians(dp)
        P = "same-node"

        def g(mode, test, key="rps"):
            return metric(m, P, mode, test, key)

        def paired(mode, base, test, key="rps"):
            # Ratio within each round (the two runs were seconds apart): min–max over rounds.
            rs = []
            for rnd in range(dp.get("rounds", 0)):
                a = [x.get(key) for x in dp["samples"] if x["round"] == rnd and x["placement"] == P
                     and x["test"] == test and x["mode"] == mode]
                b = [x.get(key) for x in dp["samples"] if x["round"] == rnd and x["placement"] == P
                     and x["test"] == test and x["mode"] == base]
                if a and b and b[0]:
                    rs.append(a[0] / b[0])
            return f"{min(rs):.2f}–{max(rs):.2f}" if rs else "–"

        def eff(mode, base, test):
            # Throughput per CPU second, as a ratio: robust to CPU time other tenants take from us.
            key = "cpu_s_per_gib" if test == "bulk" else "cpu_us_per_req"
            return ratio(g(base, test, key), g(mode, test, key))

        def check(label, mode, base, test, target, metric="rps"):
            return (label, ratio(g(mode, test, metric), g(base, test, metric)), eff(mode, base, test),
                    paired(mode, base, test, metric), target)

        checks = [
            check("`ebpf` keep-alive req/s ≥ 0.97 × `explicit` (same node)", "ebpf", "explicit", "keepalive", 0.97),
            check("`ebpf` keep-alive req/s ≥ 1.15 × `iptables` (same node)", "ebpf", "iptables", "keepalive", 1.15),
            check("`ebpf` new connections/s ≥ 1.15 × `iptables` (same node)", "ebpf", "iptables", "close", 1.15),
            check("`ebpf --accelerate` keep-alive req/s ≥ 1.10 × `ebpf` (same node)", "ebpf-accel", "ebpf",
                  "keepalive", 1.10),
            check("`ebpf --accelerate` one-stream throughput ≥ 1.10 × `ebpf` (same node)", "ebpf-accel", "ebpf",
                  "bulk", 1.10, "bytes_per_s"),
        ]
        for name, value, per_cpu, rounds, want in checks:
            verdict = "–" if value is None else ("met" if value >= want else "**missed**")
            rows.append((name, f"{f_ratio3(value)} (rounds {rounds}; per CPU {f_ratio3(per_cpu)})", verdict))
        # Issue 12: the default (sk_lookup) path on every data-path row, both placements; tc beside it.
        for mode in ("ebpf", "ebpf-tc"):
            for placement in dp.get("placements", []):
                for test, key in (("keepalive", "rps"), ("close", "rps"), ("bulk", "bytes_per_s")):
                    for base, want in (("explicit", 0.98), ("iptables", 1.0)):
                        v = ratio(metric(m, placement, mode, test, key), metric(m, placement, base, test, key))
                        if v is None:
                            continue
                        label = (f"`{MODE_LABEL.get(mode, mode)}` {test} ≥ {want:.2f} × `{base}` ({placement})")
                        verdict = ("met" if v >= want else "**missed**") if mode == "ebpf" else "for comparison"
                        rows.append((label, f_ratio3(v), verdict))
        prof = (dp.get("program_profile") or {}).get("ebpf", {})
        for case in ("same-node/keepalive", "cross-node/keepalive"):
            if case in prof:
                runs = sum(r["runs_per_req"] for r in prof[case]["programs"])
                rows.append((f"`ebpf` 0 program runs per request on established inbound connections ({case})",
                             f"{runs:.3f} runs/req (all programs, both nodes)", "met" if runs < 0.05 else "**missed**"))
        mc = datapath_medians(dp).get("cross-node", {})
        if mc:
            v = ratio(metric(m, "cross-node", "ebpf", "close", "rps"), metric(m, "cross-node", "iptables", "close", "rps"))
            rows.append(("(same check, cross node) `ebpf` new connections/s ÷ `iptables`", f_ratio(v), "for reference"))
    cp = res.get("control")
    if cp:
        for mode, b in cp.get("backends", {}).items():
            s = control_summary(b)
            api = s["enable_api_all"]
            rows.append((f"{mode}: enable one more namespace ≤ 10 ms median through the API (N = 3..{s['peak']})",
                         f"{_ms(api)} ms", "–" if api is None else ("met" if api <= 0.010 else "**missed**")))
            cli = s["enable_cli"]
            rows.append((f"{mode}: enable ≤ 250 ms through the CLI including interpreter start",
                         f"{_ms(cli)} ms", "–" if cli is None else ("met" if cli <= 0.250 else "**missed**")))
            lo, hi = s["enable_api_first100"], s["enable_api_last100"]
            flat = ratio(hi, lo)
            rows.append((f"{mode}: flat from 1 to {s['peak']} namespaces (API median, last 100 ÷ first 100 ≤ 1.5)",
                         f"{_ms(lo)} → {_ms(hi)} ms ({f_ratio(flat)})",
                         "–" if flat is None else ("met" if flat <= 1.5 else "**missed**")))
        for mode, why in cp.get("unavailable", {}).items():
            rows.append((f"{mode}: control-plane targets", "not measured", why[:120]))
    lines = ["The verdict is on the ratio of the medians over rounds. \"Rounds\" is the range of the same ratio "
             "within each round (the two runs were seconds apart). \"Per CPU\" is the ratio computed from CPU "
             "time per request (or per GiB) of our cgroups instead of from wall-clock throughput; it does not "
             "depend on how much CPU other tenants of the machine left us.", "",
             "| target | measured | verdict |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    return lines


def machine_lines(meta: Dict) -> List[str]:
    load = meta.get("load", {})
    return [
        "| | |", "|---|---|",
        f"| run | {meta.get('started')} – {meta.get('finished')} UTC, `{meta.get('command')}` |",
        f"| machine | {meta.get('cpu')} ({meta.get('cores')} cores), {meta.get('memory_gib')} GiB, {meta.get('virt') or 'bare metal?'} |",
        f"| kernel | {meta.get('kernel')} ({meta.get('os')}) |",
        f"| software | {meta.get('software')} |",
        f"| commit | {meta.get('commit')} |",
        *[f"| {part} | {text} |" for part, text in (meta.get("parts") or {}).items()],
        f"| load average (1 min) | before {load.get('before')}, after data path {load.get('after_datapath', '–')}, "
        f"after {load.get('after')} (other engineers' test runs share these 2 cores) |",
        "",
    ]


def generate(res: Dict, result_path: str) -> str:
    lines: List[str] = [BEGIN, "", f"_Generated by `python -m bench report` from `{os.path.relpath(result_path, ROOT)}`. "
                        "Do not edit between the markers; rerun instead._", "", "### Machine", ""]
    lines += machine_lines(res.get("meta", {}))
    lines += ["### Targets", ""] + targets(res)
    dp = res.get("datapath")
    if dp:
        lines += ["### Data path", "",
                  f"Medians of {dp['rounds']} interleaved rounds; every run is `wrk -t1 -c{dp['connections']} "
                  f"-d{dp['seconds']}s` (bulk: `-c1` on a 64 MiB file). Ratios are to the same placement's "
                  "`explicit` and `iptables` rows. CPU is the growth of the node cgroups' `usage_usec` (wrk, "
                  "both sidecars, nginx, and the softirq work charged to them) divided by requests.", ""]
        lines += datapath_tables(dp)
        if chart(dp):
            lines += ["![data-path ratios](benchmarks-datapath.png)", ""]
        if dp.get("program_profile"):
            lines += ["#### Where the eBPF programs spend their time", ""] + program_tables(dp)
    cp = res.get("control")
    if cp:
        lines += ["### Control plane", ""] + control_tables(cp)
        if control_chart(cp):
            lines += ["![enable/disable time against managed namespaces](benchmarks-control.png)", ""]
    cs = res.get("cli")
    if cs:
        lines += ["### CLI cold start", ""] + cli_tables(cs)
    lines.append(END)
    return "\n".join(lines)


def write(result_path: str, doc_path: str = DOC) -> str:
    with open(result_path) as f:
        res = json.load(f)
    block = generate(res, result_path)
    text = open(doc_path).read() if os.path.exists(doc_path) else TEMPLATE
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(doc_path, "w") as f:
        f.write(text)
    return doc_path
