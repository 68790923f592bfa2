"""`serve` and `loadtest`: adadiff_rt behind a real Triton Inference Server (PyTriton), no mocks.

The tests start `python -m adadiff_export serve` on free loopback ports with the tiny engines folder (from this Python it runs
itself again in the serving venv that scripts/setup.sh makes), send concurrent requests with tritonclient over
HTTP and gRPC, compare every answer with the local `Runtime` (image within 1e-5 relative, the same layers), send
each kind of bad request, run the `loadtest` command, and last stop the server with SIGTERM while requests are in
flight. They need the serving venv and tritonclient here: they fail without them in CI (ADADIFF_RT_REQUIRED=1)
and skip with the reason elsewhere.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adadiff_export.serve.protocol import MAX_STEPS
from runtime_engines import MAX_BATCH, import_runtime, rel_err
from runtime_engines import engines, model  # noqa: F401 (module fixtures)
from serve_requests import BAD_STRUCTURE, BAD_VALUES, SERVED_TOL, STEPS, assert_served_equals_local, \
    mixed_requests, noise, sample_request

adadiff_rt = import_runtime(need_openvino=True)
ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("ADADIFF_RT_REQUIRED") == "1"
# SIGTERM's drain: far above what the SIGTERM test's requests take on an idle machine (seconds), so that a busy
# one (a shared CI runner) does not cut them off; the test waits only as long as they really take.
DRAIN_SECONDS = 600


@pytest.fixture(scope="module")
def rt(engines):
    return adadiff_rt.Runtime(str(engines), threads=1)


def _tritonclient():
    if importlib.util.find_spec("tritonclient") is None:
        return "tritonclient is not installed (pip install '.[test]')"
    return None


def _free_ports(n: int):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, proc: subprocess.Popen, ports, log: Path) -> None:
        self.proc, self.log = proc, log
        self.http, self.grpc, self.metrics = ports
        self.url = f"127.0.0.1:{self.http}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def get(self, path: str, port=None) -> tuple:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port or self.http}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (urllib.error.URLError, ConnectionError) as e:  # nothing listens (yet, or any more)
            return None, str(e)

    def counter(self, name: str, model: str = "adadiff_sample") -> float:
        _, text = self.get("/metrics", self.metrics)
        m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        return float(m.group(1))


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    from adadiff_export.serve.interpreter import pytriton_problem, serve_venv, venv_python

    missing = _tritonclient()
    if missing is None and venv_python() is None and pytriton_problem() is not None:
        missing = f"the serving venv {serve_venv()} is missing (bash scripts/setup.sh makes it)"
    if missing:
        if REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)
    ports = _free_ports(3)
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "adadiff_export", "serve", str(engines), "--address", "127.0.0.1",
           "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--max-queue-delay-us", "50000", "--threads", "1", "--drain-seconds", str(DRAIN_SECONDS)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    s = Server(proc, ports, log)
    deadline = time.monotonic() + 240
    while not all(s.get(f"/v2/models/{m}/ready")[0] == 200 for m in ("adadiff_sample", "adadiff_denoise")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not become ready (exit {proc.poll()}):\n{s.log_tail()}")
        time.sleep(0.5)
    yield s
    if proc.poll() is None:  # a test failed before the SIGTERM test stopped it
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def infer_all(url: str, requests, model: str = "adadiff_sample", outputs=("image", "layers"), protocol: str = "http",
              released: threading.Event = None):
    """Send every request at once (one client and thread each, released together; `released` is set then);
    returns the answers or the exceptions, in order."""
    from adadiff_export.serve.client import Client

    results = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i):
        with Client(url, protocol) as c:
            barrier.wait()
            if released is not None:
                released.set()
            try:
                results[i] = c.infer(model, requests[i], outputs)
            except Exception as e:  # noqa: BLE001
                results[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_health_and_readiness_answer(server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/adadiff_sample/ready",
                 "/v2/models/adadiff_denoise/ready"):
        assert server.get(path)[0] == 200, path
    status, body = server.get("/v2/models/adadiff_sample/config")
    config = json.loads(body)
    assert status == 200 and config["max_batch_size"] == MAX_BATCH and "dynamic_batching" in config
    assert {i["name"] for i in config["input"]} == {"noise", "label", "threshold", "steps", "guidance"}


def test_concurrent_requests_are_batched_and_equal_the_local_runtime(server, rt):
    """Every answer equals the local runtime's, each time; and the requests sent together share executions.
    Whether they arrive within the queue delay depends on the machine's load (a compile beside the suite spread
    them once), so the burst is sent up to three times and batching must show in one of them."""
    requests = mixed_requests() + [sample_request(30, 6), sample_request(31, 8, threshold=0.5, guidance=1.0)]
    executions = []
    for _ in range(3):
        runs_before = server.counter("nv_inference_exec_count")
        served_before = server.counter("nv_inference_count")
        results = infer_all(server.url, requests)
        for request, out in zip(requests, results):
            assert not isinstance(out, Exception), out
            assert_served_equals_local(rt, request, out)
        executions.append(server.counter("nv_inference_exec_count") - runs_before)
        assert server.counter("nv_inference_count") - served_before == sum(r["noise"].shape[0] for r in requests)
        if executions[-1] < len(requests):
            break
    assert executions[-1] < len(requests), \
        f"{len(requests)} requests sent together ran in {executions} executions: no batching"


def test_grpc_denoise_equals_the_local_runtime(server, rt):
    x, t, y = noise(40, 4), np.array([0.1, 0.4, 0.6, 0.9], np.float32), np.array([2, 10, 5, 8])
    requests = [{"x": x[i:i + 1], "t": t[i:i + 1, None], "label": y[i:i + 1, None],
                 **({"threshold": np.array([[0.7]], np.float32)} if i % 2 else {})} for i in range(4)]
    results = infer_all(f"grpc://127.0.0.1:{server.grpc}", requests, "adadiff_denoise", ("eps", "exit_layer"))
    for i, out in enumerate(results):
        assert not isinstance(out, Exception), out
        kw = {"policy": "uem", "threshold": float(np.float32(0.7))} if i % 2 else {}
        eps, layer, _ = rt.denoise(x[i:i + 1], t[i:i + 1], y[i:i + 1], granularity="sample", **kw)
        assert rel_err(out["eps"], eps) <= SERVED_TOL and out["exit_layer"][0, 0] == layer[0]


TRITON_REFUSES = {  # server-side words for the structural cases (Triton's own messages)
    "wrong shape": "unexpected shape for input 'noise'",
    "wrong dtype": "input 'noise' data-type is 'FP64'",
    "batch above the limit": f"batch-size must be <= {MAX_BATCH}",
}


@pytest.mark.parametrize("case", sorted({**BAD_VALUES, **BAD_STRUCTURE}))
def test_a_bad_request_gets_an_error_naming_tensor_and_rule_and_the_server_goes_on(server, rt, case):
    from tritonclient.utils import InferenceServerException

    change, tensor, words = {**BAD_VALUES, **BAD_STRUCTURE}[case]
    bad = {**sample_request(50, 3, steps=STEPS), **change}
    good = sample_request(51, 4, steps=STEPS)
    out = infer_all(server.url, [bad])[0]
    assert isinstance(out, InferenceServerException), out
    expected = TRITON_REFUSES.get(case, f"input '{tensor}': ")
    assert expected in str(out) and (case in TRITON_REFUSES or words in str(out)), str(out)
    assert "[400]" in str(out)
    assert server.proc.poll() is None
    assert_served_equals_local(rt, good, infer_all(server.url, [good])[0])


def test_bad_requests_batched_with_good_ones_fail_alone(server, rt):
    from tritonclient.utils import InferenceServerException

    good = [sample_request(60 + i, i, steps=STEPS) for i in range(6)]
    bad = [sample_request(70, 11, steps=STEPS), sample_request(71, 3, steps=STEPS, threshold=3.0)]
    runs_before = server.counter("nv_inference_exec_count")
    results = infer_all(server.url, good[:3] + bad + good[3:])
    assert server.counter("nv_inference_exec_count") - runs_before < len(results)  # they shared batches
    assert all(isinstance(r, InferenceServerException) for r in results[3:5])
    for request, out in zip(good, results[:3] + results[5:]):
        assert not isinstance(out, Exception), out
        assert_served_equals_local(rt, request, out)


def test_loadtest_reports_both_policies_without_errors(server):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "adadiff_export", "loadtest", "--url", server.url, "--concurrency", "1,4",
           "--requests", "8", "--steps", "6", "--warmup", "2", "--json", "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    cells = {(c["concurrency"], c["mode"]): c for c in summary["cells"]}
    assert set(cells) == {(c, m) for c in (1, 4) for m in ("full depth", "default")}
    for cell in cells.values():
        assert cell["answered"] == cell["requests"] == 8 and cell["errors"] == 0
        assert cell["images_per_s"] > 0 and cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"]
    assert cells[(4, "full depth")]["mean_layers"] == 5.0       # threshold 0: every layer of the tiny model
    assert cells[(4, "default")]["mean_layers"] < 5.0           # its default, uem at 0.5, exits early
    assert [x["concurrency"] for x in summary["ratios"]] == [1, 4]
    assert "| concurrency | policy |" in r.stdout


def test_sigterm_answers_every_request_in_flight_then_exits(server):
    """Last: stops the module's server."""
    # Six full-depth requests of max_batch rows each: the dynamic batcher cannot merge them, so they run one
    # after another, several seconds in all. Six single-row requests were one batch that finished within
    # the second below on a quiet machine, and the test then saw nothing in flight.
    requests = [sample_request(80 + i, i, batch=MAX_BATCH, steps=MAX_STEPS, threshold=0.0) for i in range(6)]
    done = {}
    released = threading.Event()

    def run():
        for i, r in enumerate(infer_all(server.url, requests, released=released)):
            done[i] = (r, time.monotonic())

    client = threading.Thread(target=run)
    client.start()
    assert released.wait(60)
    time.sleep(1.0)  # sent and queued: the first batch is running, the others wait their turn
    term_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    client.join(DRAIN_SECONDS)
    assert len(done) == len(requests)
    for i, (out, at) in done.items():
        assert not isinstance(out, Exception), f"request {i} was lost at SIGTERM: {out}\n{server.log_tail()}"
        assert out["image"].shape == (MAX_BATCH, 1, 8, 8) and np.isfinite(out["image"]).all()
    assert max(at for _, at in done.values()) > term_at  # some were still running when SIGTERM came
    assert server.proc.wait(DRAIN_SECONDS) == 0, server.log_tail()
    deadline = time.monotonic() + 120  # tritonserver, its backend stubs and their helpers end too
    while _group_alive(server.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _group_alive(server.proc.pid), subprocess.run(["ps", "-g", str(server.proc.pid), "-o", "pid,cmd"],
                                                             capture_output=True, text=True).stdout
    assert "stopped" in server.log_tail(5)
    assert server.get("/v2/health/live")[0] is None  # nothing listens any more
