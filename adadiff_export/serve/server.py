"""adadiff_rt behind Triton Inference Server, through PyTriton: the two models, the dynamic batcher, the instances,
per-request errors, and a drain on SIGTERM.

PyTriton runs `tritonserver` (with its Python backend) as a child process; each model instance is a backend stub
that hands the batches Triton forms to a handler thread in *this* process, where the Runtimes live. Instance k of
both models shares Runtime k (a Runtime runs one call at a time; separate Runtimes run in parallel).

Per-request errors: PyTriton answers an exception raised by an inference callable with the same error for every
request of the batch, so one bad request would fail the good ones Triton batched with it. The proxy model that
PyTriton loads into the backend stub is patched (`_install_request_errors`, checked against the pinned
nvidia-pytriton at start) so that a response holding `ERROR_OUTPUT` becomes that request's own error response
(HTTP 400, gRPC INVALID_ARGUMENT), and the rest of the batch is answered normally. PyTriton's own wait for
tritonserver to stop (30 s, then a kill) is lengthened to the drain time (`_allow_drain`).

Shutdown: SIGTERM or SIGINT stops Triton, which refuses new requests, finishes those in flight (queued ones
included, up to `ServeOptions.drain_seconds`), unloads the models and exits; then the handler threads stop and
`serve` returns. A request still running when that time is up is lost (Triton exits anyway), so the drain time
must exceed the longest request the server may be running (a 1000-step batch of max_batch samples at worst).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Callable, List

import numpy as np

from ..errors import UserError
from .handlers import DenoiseHandler, SampleHandler
from .protocol import DENOISE_MODEL, SAMPLE_MODEL, ModelFacts, RequestError, denoise_inputs, denoise_outputs, \
    sample_inputs, sample_outputs

PYTRITON_VERSION = "0.7.0"   # pinned in pyproject.toml's `serve` extra; the request-error patch is checked against it
ERROR_OUTPUT = "__adadiff_request_error__"
_WRAP = "def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):\n"
_WRAP_WITH_ERRORS = _WRAP + (
    "    if response.data is not None and {key!r} in response.data:  # adadiff: this request's own error\n"
    "        _message = bytes(response.data[{key!r}].reshape(-1)[0]).decode('utf-8', 'replace')\n"
    "        _code = getattr(pb_utils.TritonError, 'INVALID_ARG', None)\n"
    "        _error = pb_utils.TritonError(_message) if _code is None else pb_utils.TritonError(_message, _code)\n"
    "        return pb_utils.InferenceResponse(error=_error)\n"
).format(key=ERROR_OUTPUT)


class ServeError(UserError):
    """The server cannot start: a missing engines folder, a PyTriton whose proxy this module cannot patch, a port
    in use."""


@dataclasses.dataclass
class ServeOptions:
    engines: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    instances: int = 1
    max_queue_delay_us: int = 2000
    threads: int = 0                 # OpenVINO threads per instance; 0 = the CPU count divided among the instances
    drain_seconds: int = 30          # Triton's exit timeout: how long in-flight requests may take to finish on SIGTERM
    max_batch: int = 0               # the largest batch Triton forms and accepts; 0 = the engines' max batch

    def check(self) -> None:
        if not (Path(self.engines) / "manifest.json").is_file():
            raise ServeError(f"{self.engines} is not an engines folder (no manifest.json; build one with "
                             f"`python -m adadiff_export build -o {self.engines}`)")
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 1 <= port <= 65535:
                raise ServeError(f"--{name.replace('_', '-')} must be in 1..65535, got {port}")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ServeError("--http-port, --grpc-port and --metrics-port must differ")
        if self.instances < 1:
            raise ServeError(f"--instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0:
            raise ServeError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.drain_seconds < 1:
            raise ServeError(f"--drain-seconds must be >= 1, got {self.drain_seconds}")
        if self.threads < 0:
            raise ServeError(f"--threads must be >= 0, got {self.threads}")
        if self.max_batch < 0:
            raise ServeError(f"--max-batch must be >= 0 (0: the engines' max batch), got {self.max_batch}")

    def batch_limit(self, engines_max_batch: int) -> int:
        """The served max batch: --max-batch, which the engines must hold, or the engines' own."""
        if self.max_batch > engines_max_batch:
            raise ServeError(f"--max-batch {self.max_batch} is above the engines' max batch {engines_max_batch} "
                             f"(rebuild them with `build --max-batch {self.max_batch}`)")
        return self.max_batch or engines_max_batch

    def check_ports_free(self) -> None:
        """Refuse a port another process holds now, before Triton starts (it would only log the failure)."""
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((self.address, port))
                except OSError as e:
                    raise ServeError(f"--{name.replace('_', '-')} {port} on {self.address}: {e.strerror}") from None

    def threads_per_instance(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.instances)


def _answers(handler: Callable) -> Callable:
    """The PyTriton inference callable around a handler: a RequestError becomes that request's error output."""

    def infer(requests):
        return [{ERROR_OUTPUT: np.array([str(r).encode()], dtype=np.object_)} if isinstance(r, RequestError) else r
                for r in handler(requests)]

    return infer


def _install_request_errors() -> None:
    """Make PyTriton's proxy model answer `ERROR_OUTPUT` as the request's own error (see the module docstring)."""
    from pytriton.models import model as pytriton_model

    source = (Path(pytriton_model.__file__).parent.parent / "proxy" / "model.py").read_text()
    if _WRAP not in source:
        import importlib.metadata

        raise ServeError(f"nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')}: its proxy model has no "
                         f"`_wrap_response` to answer a bad request on its own; install nvidia-pytriton=="
                         f"{PYTRITON_VERSION} (`pip install '.[serve]'`)")
    original = pytriton_model.Model.get_proxy_model_files
    if getattr(original, "adadiff_request_errors", False):
        return

    def get_proxy_model_files(self):
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        files[key] = files[key].decode().replace(_WRAP, _WRAP_WITH_ERRORS, 1).encode()
        return files

    get_proxy_model_files.adadiff_request_errors = True
    pytriton_model.Model.get_proxy_model_files = get_proxy_model_files


def _allow_drain(seconds: int) -> None:
    """PyTriton's stop() waits a fixed 30 s for tritonserver to exit after SIGINT, then kills it, whatever Triton's
    own exit timeout says; a longer drain would be cut off there (requests in flight lost). Wait the drain time
    plus a margin for unloading (the module constant is read at each stop(); checked with the pinned 0.7.0)."""
    from pytriton.server import triton_server

    if not hasattr(triton_server, "SERVER_OUTPUT_TIMEOUT_SECS"):
        raise ServeError(f"nvidia-pytriton has no SERVER_OUTPUT_TIMEOUT_SECS to lengthen the drain with; install "
                         f"nvidia-pytriton=={PYTRITON_VERSION} (`pip install '.[serve]'`)")
    triton_server.SERVER_OUTPUT_TIMEOUT_SECS = max(triton_server.SERVER_OUTPUT_TIMEOUT_SECS, seconds + 30)


def _tensors(specs) -> List:
    from pytriton.model_config import Tensor

    return [Tensor(name=s.name, dtype=s.dtype, shape=s.shape, optional=s.optional) for s in specs]


def serve(o: ServeOptions, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> None:
    """Run the server until SIGTERM or SIGINT, then drain and return."""
    o.check()
    o.check_ports_free()
    import adadiff_rt
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    _install_request_errors()
    _allow_drain(o.drain_seconds)
    stop = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        threads = o.threads_per_instance()
        runtimes = [adadiff_rt.Runtime(str(o.engines), threads=threads) for _ in range(o.instances)]
        facts = ModelFacts.of(runtimes[0])
        facts = dataclasses.replace(facts, max_batch=o.batch_limit(facts.max_batch))
        d = runtimes[0].default_exit
        log(f"engines {o.engines}: {facts.in_chans}x{facts.img_size}x{facts.img_size}, "
            f"{facts.num_classes or 'no'} classes, depth {facts.depth}, max batch {facts.max_batch}; default exit "
            f"{d['policy']} (a request's threshold applies the uem policy); {o.instances} instance(s), "
            f"{threads} OpenVINO thread(s) each")
        config = TritonConfig(http_address=o.address, http_port=o.http_port, grpc_address=o.address,
                              grpc_port=o.grpc_port, metrics_port=o.metrics_port, exit_timeout_secs=o.drain_seconds)
        triton = Triton(config=config)
        batching = ModelConfig(max_batch_size=facts.max_batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=o.max_queue_delay_us))
        triton.bind(SAMPLE_MODEL, [_answers(SampleHandler(rt, facts)) for rt in runtimes],
                    inputs=_tensors(sample_inputs(facts)), outputs=_tensors(sample_outputs(facts)), config=batching)
        triton.bind(DENOISE_MODEL, [_answers(DenoiseHandler(rt, facts)) for rt in runtimes],
                    inputs=_tensors(denoise_inputs(facts)), outputs=_tensors(denoise_outputs(facts)), config=batching)
        try:
            if not stop.is_set():
                triton.run()
                host = "localhost" if o.address in ("0.0.0.0", "::") else o.address
                log(f"serving {SAMPLE_MODEL} and {DENOISE_MODEL}: http://{host}:{o.http_port}, grpc {host}:{o.grpc_port}, "
                    f"metrics http://{host}:{o.metrics_port}/metrics; ready when "
                    f"GET /v2/models/{SAMPLE_MODEL}/ready answers 200")
            while not stop.wait(1.0):
                if not triton.is_alive():
                    raise ServeError("Triton Inference Server stopped on its own (its log above says why)")
            log(f"{received[0] if received else 'stop'}: refusing new requests, finishing those in flight "
                f"(up to {o.drain_seconds} s)")
        finally:
            triton.stop()
        log("stopped")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
