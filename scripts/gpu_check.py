"""The GPU checks of issue 17 that pytest does not hold, one table row each (run by scripts/gpu_check.sh).

Each row is PASS, FAIL (with what went wrong) or SKIP (with why: no GPU, no TensorRT, one GPU only).
On a machine without a GPU every row skips, which is how this script is tested where it was written.
Exit status: 1 when any row failed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import adadiff_rt  # noqa: E402
from conftest import tiny_model  # noqa: E402
from runtime_engines import inputs, manifest_only, oracle, rel_err, save_checkpoint, torch_segments  # noqa: E402

ROWS = []
GPU = adadiff_rt.has_cuda and torch.cuda.is_available()
TRT = adadiff_rt.has_tensorrt and GPU


class Skip(Exception):
    pass


def row(name):
    def run(fn):
        try:
            detail = fn()
            ROWS.append((name, "PASS", detail or ""))
        except Skip as e:
            ROWS.append((name, "SKIP", str(e)))
        except Exception as e:  # a check that fails says why and the others still run
            traceback.print_exc()
            ROWS.append((name, "FAIL", f"{type(e).__name__}: {str(e)[:160]}"))
        return fn
    return run


def need_gpu():
    if not GPU:
        raise Skip("no CUDA GPU" if adadiff_rt.has_cuda else "adadiff_rt built without CUDA")


def need_trt_library():
    need_gpu()
    if not adadiff_rt.has_tensorrt:
        raise Skip("adadiff_rt built without TensorRT (NvInfer.h / libnvinfer / libnvonnxparser not found)")


def need_trt():
    """TensorRT in adadiff_rt and the `tensorrt` Python package (the exporter builds plans with it)."""
    need_trt_library()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise Skip("the tensorrt Python package is missing (plans are built with it)") from None


@row("1 kernels for this GPU's architecture")
def _arch():
    need_gpu()
    major, minor = torch.cuda.get_device_capability(0)
    cc = 10 * major + minor
    entries = [a.split("-") for a in adadiff_rt.cuda_architectures.split(",")]
    sass = {int(a[0]) for a in entries if a[1:] != ["virtual"]}
    ptx = {int(a[0]) for a in entries if a[1:] != ["real"]}
    # SASS runs on later minors of its major; PTX is JIT-compiled for any later GPU.
    ok = any(s // 10 == major and s <= cc for s in sass) or any(p <= cc for p in ptx)
    if not ok:
        raise AssertionError(f"sm_{cc} is not served by {adadiff_rt.cuda_architectures}")
    return f"sm_{cc} served by {adadiff_rt.cuda_architectures}"


def _dlpack_runtime(tmp, max_batch=8, device_id=0):
    model = tiny_model(uem_gain=20.0)
    folder = manifest_only(model, Path(tmp) / f"dl{device_id}", max_batch)
    dev = f"cuda:{device_id}"
    rt = adadiff_rt.Runtime(str(folder), device="cuda", device_id=device_id,
                            segments=torch_segments(tiny_model(uem_gain=20.0).to(dev), dev))
    return model, rt


@row("3 torch CUDA tensors in and out, stream=")
def _device_tensors():
    need_gpu()
    with tempfile.TemporaryDirectory() as tmp:
        model, rt = _dlpack_runtime(tmp)
        x, t, y = inputs(model, 5, seed=1)
        want = rt.denoise(x, t, y, threshold=0.5)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            got = rt.denoise(*(torch.from_numpy(a).cuda() for a in (x, t, y)), threshold=0.5, stream=s)
        s.synchronize()
        assert all(g.is_cuda for g in got)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g.cpu().numpy(), w)
        return "eps, exit layers and u equal numpy's; results on cuda"


@row("2 device restored after a Runtime on GPU 1")
def _device_restore():
    need_gpu()
    if torch.cuda.device_count() < 2:
        raise Skip("one GPU: a Runtime on device_id=1 needs two")
    torch.cuda.set_device(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, rt = _dlpack_runtime(tmp, device_id=1)
        assert torch.cuda.current_device() == 0, "constructing left the thread on GPU 1"
        rt.denoise(*inputs(model, 2), threshold=0.5)
        assert torch.cuda.current_device() == 0, "denoise left the thread on GPU 1"
    return "current device 0 after construction and denoise on GPU 1"


def _trt_folder(tmp, max_batch=8, tensorrt="on"):
    from adadiff_export.export.build import build_engines
    model = tiny_model(uem_gain=20.0)
    ckpt = save_checkpoint(model, Path(tmp) / "tiny.pt")
    out = build_engines(ckpt, Path(tmp) / "engines", max_batch=max_batch, tensorrt=tensorrt, log=lambda s: None)
    return model, out


@row("2 TensorRT: plans vs oracle, guided sampling at 2 x max_batch")
def _trt_parity():
    need_trt()
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = _trt_folder(tmp)
        prof = json.loads((folder / "manifest.json").read_text())["tensorrt"]["profile"]
        assert prof["max"] == 16, prof
        rt = adadiff_rt.Runtime(str(folder), device="cuda")
        x, t, y = inputs(model, 8, seed=2)
        eps, layer, _ = rt.denoise(x, t, y, threshold=0.5)
        ref_eps, ref_layer, _ = oracle(model, x, t, y, threshold=0.5)
        np.testing.assert_array_equal(layer, ref_layer)
        err = rel_err(eps, ref_eps)
        noise = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
        images, used = rt.sample(noise, np.arange(8) % 10, steps=3, guidance=2.0, threshold=0.5)
        assert used.shape == (3, 16)
        return f"exit layers equal, eps rel err {err:.1e}; sample(8 rows, guidance 2) ran 16 rows"


@row("2 TensorRT: another version in the manifest: refused (never), rebuilt (auto)")
def _trt_mismatch():
    need_trt()
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = _trt_folder(tmp)
        m = json.loads((folder / "manifest.json").read_text())
        m["tensorrt"]["version"] = "9.0.0"
        (folder / "manifest.json").write_text(json.dumps(m))
        try:
            adadiff_rt.Runtime(str(folder), device="cuda", build_plans="never")
            raise AssertionError("plans recorded as TensorRT 9.0.0 were loaded")
        except RuntimeError as e:
            assert "built by TensorRT 9.0.0" in str(e), e
        rt = adadiff_rt.Runtime(str(folder), device="cuda")
        x, t, y = inputs(model, 4, seed=3)
        np.testing.assert_array_equal(rt.denoise(x, t, y, threshold=0.5)[1], oracle(model, x, t, y, threshold=0.5)[1])
        built = len(list((folder / "tensorrt_cache").glob("*.plan")))
        return f"never: refused; auto: {built} plans rebuilt into tensorrt_cache, exit layers equal the oracle's"


@row("2 register-plans: trtexec plans registered, a fake refused")
def _register():
    need_trt()
    if not shutil.which("trtexec"):
        raise Skip("trtexec is not on PATH")
    from adadiff_export.export.register_plans import RegisterError, register_plans
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = _trt_folder(tmp, tensorrt="off")
        subprocess.run(["sh", "trtexec.sh"], cwd=folder, check=True, capture_output=True)
        register_plans(folder, log=lambda s: None)
        rt = adadiff_rt.Runtime(str(folder), device="cuda")
        rt.denoise(*inputs(model, 4), threshold=0.5)
        (folder / "head.plan").write_bytes(b"fake")
        try:
            register_plans(folder, log=lambda s: None)
        except RegisterError as e:
            return f"registered and ran; fake head.plan: {str(e)[:60]}..."
        raise AssertionError("a fake plan was registered")


def _mean_ms(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


@row("5 CUDA graphs: on and off give the same results")
def _graphs():
    need_trt_library()
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = _trt_folder(tmp, tensorrt="off")
        x, t, y = inputs(model, 4, seed=4)
        noise = np.random.default_rng(4).standard_normal((4, 1, 8, 8)).astype(np.float32)
        runs, captured, ms = {}, {}, {}
        for graphs in (False, True):
            rt = adadiff_rt.Runtime(str(folder), device="cuda", cuda_graphs=graphs)
            runs[graphs] = [rt.sample(noise, y, steps=4, policy="static", static_layer=3)[0],
                            rt.sample(noise, y, steps=4, policy="uem", threshold=0.5)[0],
                            rt.full(x, t, y)]
            captured[graphs] = rt.graphs_captured
            ms[graphs] = _mean_ms(lambda: rt.denoise(x[:1], t[:1], y[:1], policy="static", static_layer=3))
        assert captured[False] == 0 and captured[True] > 0, captured
        for off, on in zip(runs[False], runs[True]):
            np.testing.assert_array_equal(off, on)
        return (f"{captured[True]} graphs; static, uem and full identical; denoise static L3 batch 1: "
                f"{ms[False]:.3f} ms plain, {ms[True]:.3f} ms graphs")


@row("2 Runtime(build_plans='auto'): plans built from ONNX, then read from the cache")
def _build_plans():
    need_trt_library()
    with tempfile.TemporaryDirectory() as tmp:
        model, folder = _trt_folder(tmp, tensorrt="off")
        try:
            adadiff_rt.Runtime(str(folder), device="cuda", build_plans="never")
            raise AssertionError("a folder without plans opened with build_plans='never'")
        except RuntimeError as e:
            assert "build_plans='never'" in str(e), e
        t0 = time.perf_counter()
        rt = adadiff_rt.Runtime(str(folder), device="cuda")
        built_s = time.perf_counter() - t0
        plans = sorted((folder / "tensorrt_cache").glob("*.plan"))
        stamps = [p.stat().st_mtime_ns for p in plans]
        x, t, y = inputs(model, 8, seed=5)
        eps, layer, _ = rt.denoise(x, t, y, threshold=0.5)
        ref_eps, ref_layer, _ = oracle(model, x, t, y, threshold=0.5)
        np.testing.assert_array_equal(layer, ref_layer)
        assert rt.sample(np.zeros((8, 1, 8, 8), np.float32), np.arange(8) % 10, steps=2,
                         guidance=2.0)[1].shape == (2, 16)
        t0 = time.perf_counter()
        adadiff_rt.Runtime(str(folder), device="cuda")
        again_s = time.perf_counter() - t0
        assert [p.stat().st_mtime_ns for p in plans] == stamps, "the cached plans were built again"
        return (f"{len(plans)} plans built in {built_s:.1f} s, reopened from the cache in {again_s:.1f} s; "
                f"exit layers equal, eps rel err {rel_err(eps, ref_eps):.1e}; guided 2 x max_batch ran")


if __name__ == "__main__":
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"GPU: {name}; adadiff_rt cuda={adadiff_rt.has_cuda} ({adadiff_rt.cuda_architectures or '-'}), "
          f"tensorrt={adadiff_rt.has_tensorrt} ({adadiff_rt.tensorrt_version})")
    width = max(len(r[0]) for r in ROWS)
    print(f"{'check':<{width}} | result | detail")
    for n, res, detail in sorted(ROWS, key=lambda r: r[0]):
        print(f"{n:<{width}} | {res:<6} | {detail}")
    sys.exit(1 if any(r[1] == "FAIL" for r in ROWS) else 0)
