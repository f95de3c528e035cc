"""``python -m bench``: run the benchmark matrix, write results, regenerate docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys

from bench import report

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PARTS = ("datapath", "control", "cli")


def log(msg: str) -> None:
    print(msg, flush=True)


def _out(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def loadavg() -> float:
    return float(open("/proc/loadavg").read().split()[0])


def machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal")), 0)
    os_name = next((l.split("=", 1)[1].strip().strip('"') for l in open("/etc/os-release") if l.startswith("PRETTY_NAME")), "?")
    versions = [
        _out("haproxy", "-v").splitlines()[0].split(" - ")[0] if shutil.which("haproxy") else "",
        (subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
         if shutil.which("nginx") else ""),
        "wrk " + (_out("dpkg-query", "-W", "-f", "${Version}", "wrk") or "?"),
        f"Python {platform.python_version()}",
    ]
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / (1 << 20), 1),
        "kernel": platform.release(), "os": os_name, "virt": _out("systemd-detect-virt") or None,
        "software": ", ".join(v for v in versions if v),
        "commit": _out("git", "-C", report.ROOT, "rev-parse", "--short", "HEAD"),
    }


def cmd_run(args) -> int:
    if os.geteuid() != 0:
        log("bench: run as root (namespaces, cgroups, eBPF)")
        return 3
    from bench import pods

    only = set(args.only.split(",")) if args.only else set(PARTS)
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1 if args.quick else 3)
    count = args.namespaces or (100 if args.quick else 1000)
    cli_every = args.cli_every or (25 if args.quick else 100)
    started = dt.datetime.utcnow()
    res = {"meta": dict(machine(), started=started.strftime("%Y-%m-%d %H:%M"),
                        command="python -m bench run " + " ".join(sys.argv[2:]), quick=args.quick,
                        load={"before": loadavg()})}
    log(f"bench: {res['meta']['cpu']}, kernel {res['meta']['kernel']}, load {res['meta']['load']['before']}")
    removed = pods.sweep()
    if removed:
        log(f"bench: swept {len(removed)} leftovers of earlier runs")
    modes = args.modes.split(",") if args.modes else None
    placements = args.placements.split(",") if args.placements else None
    if "cli" in only:
        log("bench: CLI cold start")
        from bench import coldstart

        res["cli"] = coldstart.run(runs=10 if args.quick else 30, log=log)
    if "datapath" in only:
        from bench import datapath

        log(f"bench: data path, {rounds} round(s) of {seconds}s runs")
        with pods.BenchCluster(nodes=datapath.NODES) as cluster:
            res["datapath"] = datapath.run(cluster, rounds=rounds, seconds=seconds,
                                           modes=[m for m in (modes or datapath.MODES) if m in datapath.MODES],
                                           placements=placements or datapath.PLACEMENTS, log=log)
        res["meta"]["load"]["after_datapath"] = loadavg()
    if "control" in only:
        from bench import control

        log(f"bench: control plane, {count} namespaces")
        with pods.BenchCluster(nodes=1) as cluster:
            res["control"] = control.run(cluster, count=count, cli_every=cli_every,
                                         latency_seconds=1 if args.quick else 2, latency_reps=1 if args.quick else 3,
                                         modes=[m for m in (modes or control.MODES) if m in control.MODES],
                                         log=log)
    res["meta"]["load"]["after"] = loadavg()
    res["meta"]["finished"] = dt.datetime.utcnow().strftime("%Y-%m-%d %H:%M")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, started.strftime("%Y%m%dT%H%M%S") + ("-quick" if args.quick else "") + ".json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    log(f"bench: results in {os.path.relpath(path)}")
    if args.report if args.report is not None else not args.quick:
        log(f"bench: wrote {report.write(path)}")
    return 0


def latest_result() -> str:
    files = sorted(f for f in os.listdir(RESULTS) if f.endswith(".json") and "quick" not in f)
    if not files:
        raise SystemExit("bench: no full results in bench/results; run 'python -m bench run' first")
    return os.path.join(RESULTS, files[-1])


def cmd_report(args) -> int:
    path = args.result or latest_result()
    log(f"bench: wrote {report.write(path)} from {path}")
    return 0


def cmd_sweep(args) -> int:
    from bench import pods

    for item in pods.sweep():
        log(f"removed {item}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the matrix, write bench/results/<time>.json and docs/benchmarks.md")
    r.add_argument("--quick", action="store_true", help="1-2 minute smoke run (1 round, 1 s runs, 100 namespaces); "
                                                         "does not rewrite the docs unless --report")
    r.add_argument("--rounds", type=int, help="interleaved rounds of the data path (default 5)")
    r.add_argument("--seconds", type=int, help="length of each wrk run (default 3)")
    r.add_argument("--namespaces", type=int, help="idle namespaces for the control plane (default 1000)")
    r.add_argument("--cli-every", type=int, help="every Nth enable/disable goes through the CLI (default 100)")
    r.add_argument("--only", help=f"comma list of parts: {','.join(PARTS)}")
    r.add_argument("--modes", help="comma list of modes (default: all available)")
    r.add_argument("--placements", help="data path: comma list of same-node, cross-node (default: both)")
    r.add_argument("--report", dest="report", action="store_true", default=None, help="rewrite docs after a quick run")
    r.add_argument("--no-report", dest="report", action="store_false", help="do not rewrite docs/benchmarks.md")
    r.set_defaults(fn=cmd_run)
    rep = sub.add_parser("report", help="regenerate docs/benchmarks.md and the chart from a results file")
    rep.add_argument("result", nargs="?", help="results JSON (default: the newest full run)")
    rep.set_defaults(fn=cmd_report)
    sw = sub.add_parser("sweep", help="remove leftovers of interrupted runs (prefix mi-b)")
    sw.set_defaults(fn=cmd_sweep)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
