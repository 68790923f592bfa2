"""`python -m adadiff_export serve ENGINES`: adadiff_rt behind Triton Inference Server (PyTriton)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    """Register `serve`."""
    p = sub.add_parser(
        "serve", help="serve an engines folder with Triton Inference Server (dynamic batching, early exit per request)",
        description="Start Triton Inference Server (through PyTriton) with adadiff_rt inside and two models: "
                    "adadiff_sample (noise, label, optional threshold, steps, guidance -> image, layers) and "
                    "adadiff_denoise (x, t, label, optional threshold -> eps, exit_layer). Requests that arrive "
                    "together run as one batch, each sample exiting at its own layer; without a threshold a sample "
                    "exits by the engines' default policy, with one by the uem policy at that threshold (0 = full "
                    "depth). SIGTERM or Ctrl-C finishes the requests in flight, then exits. PyTriton needs a Python "
                    "whose libpython matches its standard library: from any other Python this command runs itself "
                    "again in the serving venv that scripts/setup.sh makes (README, 'Serving').")
    p.add_argument("engines", type=Path, help="engines folder written by `build`")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument("--address", default="0.0.0.0",
                   help="address the HTTP and gRPC servers bind to (default 0.0.0.0: every interface)")
    p.add_argument("--instances", type=int, default=1,
                   help="model instances (each its own Runtime; batches run on them in parallel; default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long the dynamic batcher may hold a request to batch it with later ones (default 2000)")
    p.add_argument("--max-batch", type=int, default=0,
                   help="the largest batch the dynamic batcher forms (and a request may carry); default 0: the "
                        "engines' max batch. Below it, a queue of requests runs as several smaller batches, which on "
                        "a CPU can give more images/s than one large batch (README, 'Serving')")
    p.add_argument("--drain-seconds", type=int, default=30,
                   help="on SIGTERM, how long requests in flight may take to finish before Triton exits anyway "
                        "(default 30)")
    p.add_argument("--threads", type=int, default=0,
                   help="OpenVINO threads per instance (default 0: the CPUs divided among the instances)")
    p.set_defaults(func=_cmd_serve)


def _argv(a: argparse.Namespace) -> list:
    """The command line that runs this same `serve` again (in the serving venv)."""
    return ["serve", str(a.engines.resolve()), "--http-port", str(a.http_port), "--grpc-port", str(a.grpc_port),
            "--metrics-port", str(a.metrics_port), "--address", a.address, "--instances", str(a.instances),
            "--max-queue-delay-us", str(a.max_queue_delay_us), "--threads", str(a.threads),
            "--drain-seconds", str(a.drain_seconds), "--max-batch", str(a.max_batch)]


def _cmd_serve(a: argparse.Namespace) -> int:
    from ..serve.interpreter import pytriton_problem, reexec
    from ..serve.server import ServeOptions, serve

    o = ServeOptions(engines=a.engines, http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port,
                     address=a.address, instances=a.instances, max_queue_delay_us=a.max_queue_delay_us,
                     threads=a.threads, drain_seconds=a.drain_seconds, max_batch=a.max_batch)
    o.check()
    problem = pytriton_problem()
    if problem is not None:
        reexec(_argv(a), problem)   # does not return
    serve(o)
    return 0
