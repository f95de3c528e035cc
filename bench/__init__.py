"""meshintercept benchmark harness: what each interception mode costs, measured side by side.

Run it on demand (never part of the test suite):

    .venv/bin/python -m bench run [--quick] [--rounds N] [--only datapath,control,cli]
    .venv/bin/python -m bench report [RESULT.json]
    .venv/bin/python -m bench sweep

Everything runs in network namespaces and child cgroups the harness creates (10.231.0.0/16),
and is removed at the end, even on failure. See bench/README.md and docs/benchmarks.md.
"""
