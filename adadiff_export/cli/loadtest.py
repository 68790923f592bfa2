"""`python -m adadiff_export loadtest --url localhost:8000`: load a running `serve`, full depth against the default
exit policy, side by side."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def add_parser(sub) -> None:
    """Register `loadtest`."""
    p = sub.add_parser(
        "loadtest", help="load a running `serve`: throughput, latency, layers, errors; full depth vs default policy",
        description="Closed-loop load test of adadiff_sample on a running `serve`: CONCURRENCY clients each send one "
                    "sample at a time until REQUESTS are sent, once with threshold 0 (full depth) and once without "
                    "(the engines' default exit policy), on the same noise and labels. Prints throughput "
                    "(images/s), p50/p95/p99 latency, mean layers and errors per mode, and their ratios. Exit "
                    "status 1 when any request failed or went unanswered. Needs tritonclient; from a Python "
                    "without it, runs itself again in the serving venv.")
    p.add_argument("--url", default="localhost:8000",
                   help="the server: host:port (HTTP), http://host:port or grpc://host:port (default localhost:8000)")
    p.add_argument("--concurrency", default="8",
                   help="clients in flight; a comma-separated list runs each in turn (e.g. 1,8,32; default 8)")
    p.add_argument("--requests", type=int, default=256, help="measured requests per mode and concurrency (default 256)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps per request (default: the server's, 50)")
    p.add_argument("--num-classes", type=int, default=10,
                   help="labels cycle through 0..N-1 (default 10; ignored for an unconditional model)")
    p.add_argument("--warmup", type=int, default=None,
                   help="unmeasured requests per mode before measuring (default: the concurrency, one batch's worth)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure in this many alternating slices per mode, so both see the same background load")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the requests' noise")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of latency against throughput here")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary as the last line")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_loadtest)


def _concurrencies(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--concurrency must be integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--concurrency must be >= 1, got {text!r}")
    return values


def _argv(a: argparse.Namespace) -> list:
    argv = ["loadtest", "--url", a.url, "--concurrency", a.concurrency, "--requests", str(a.requests),
            "--num-classes", str(a.num_classes), "--rounds", str(a.rounds), "--timeout", str(a.timeout),
            "--seed", str(a.seed)]
    for flag, value in (("--steps", a.steps), ("--warmup", a.warmup), ("--plot", a.plot and a.plot.resolve())):
        if value is not None:
            argv += [flag, str(value)]
    return argv + [f for f, on in (("--json", a.json), ("--no-progress", a.no_progress)) if on]


def _cmd_loadtest(a: argparse.Namespace) -> int:
    from ..serve import loadtest
    from ..serve.interpreter import reexec

    concurrencies = _concurrencies(a.concurrency)
    w = loadtest.Workload(url=a.url, requests=a.requests, steps=a.steps, num_classes=a.num_classes, seed=a.seed,
                          warmup=a.warmup, rounds=a.rounds, timeout=a.timeout)
    w.check()
    if importlib.util.find_spec("tritonclient") is None:
        reexec(_argv(a), f"tritonclient is not installed in this Python ({sys.executable})")  # does not return
    try:
        cells = loadtest.run(w, concurrencies, progress=not a.no_progress,
                             log=lambda m: print(m, file=sys.stderr, flush=True))
    except ConnectionError as e:
        raise ValueError(f"cannot load {a.url}: {e}") from None
    print(loadtest.table(cells))
    if a.plot is not None:
        print(f"wrote {loadtest.plot(cells, a.plot)}")
    if a.json:
        print(loadtest.summary_json(w, cells))
    lost = sum(c.sent - c.answered for c in cells)
    if lost:
        first = next(e for c in cells for e in c.errors)
        print(f"error: {lost} request(s) failed or went unanswered; the first: {first}", file=sys.stderr)
        return 1
    return 0
