#!/usr/bin/env python
"""The bench on a GPU machine: PyTorch peers against adadiff_rt's CUDA path (torch engines over DLPack).

For a machine with an NVIDIA GPU and torch+CUDA, without OpenVINO or TensorRT. adadiff_rt must be
built there with CUDA (`pip install .`; `adadiff_rt.has_cuda` is then True).
Its `engine="dlpack"` runs each segment as a Python callable on the runtime's own CUDA buffers
(zero-copy DLPack views); here the callables are the PyTorch model's own pieces (stem, block i with
its UEM, head), so the runtime's exit logic, compaction and sampler kernels run for real on the GPU.

Measured, interleaved, medians after warm-up, at batch 1, 8 and 64 (`--batches`): one denoiser call
and one whole 50-step DPM-Solver++ run with guidance, for
- torch-eager (full depth), torch-authors (head and UEM at every layer, one decision per batch);
- adadiff_rt (dlpack, cuda) at threshold 0, at the default threshold (granularity sample and batch),
  static exit at the matched layer budget.
Ideal speedups come from per-segment CUDA-event timings of the same callables. Quality (FD,
accuracy) does not depend on the device beyond float error: it is measured by the CPU bench.

    python scripts/gpu_bench.py [--checkpoint CKPT] [--engines DIR] [--json rows.json]
    python scripts/gpu_bench.py --device cpu --batches 1 2   # a dry run of the same path on CPU

Status: run here only as the CPU dry run (device cpu, tiny config); no GPU was available to us, so
no GPU figure has been measured with it yet.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from adadiff_export.bench import harness, report  # noqa: E402
from adadiff_export.bench.config import BenchConfig  # noqa: E402
from adadiff_export.bench.contenders import (AuthorsEarlyExit, Contender, RtSetting, authors_layers,  # noqa: E402
                                             engines_match, full_depth_layers, python_contender, rt_contender)
from adadiff_export.bench.run import denoise_inputs, time_cell  # noqa: E402
from adadiff_export.model.checkpoint import SHIPPED_CHECKPOINT, Loaded, load  # noqa: E402
from adadiff_export.sampling.generate import default_guidance, default_threshold, noise_and_labels  # noqa: E402


def torch_segments(model, manifest: dict, device: torch.device) -> Dict[str, Callable]:
    """{segment name: callable(*DLPack views) -> torch tensors} computing each segment with the model's pieces."""
    def t(v) -> torch.Tensor:
        return torch.from_dlpack(v)

    def stem(x, tt, y=None):
        h, temb = model.stem(t(x), t(tt), None if y is None else t(y))
        return h.contiguous(), temb.contiguous()

    def layer(i: int) -> Callable:
        def fn(h_in, temb, skip=None):
            te = t(temb)
            h = model.layer(i, t(h_in), None if skip is None else t(skip))
            u = model.uncertainty(i, h, te).mean(dim=(1, 2, 3))
            return h.contiguous(), u.contiguous()
        return fn

    def head(h):
        return model.head(t(h)).contiguous()

    def full(x, tt, y=None):
        return model(t(x), t(tt), None if y is None else t(y)).contiguous()

    fns: Dict[str, Callable] = {}
    for seg in manifest["segments"]:
        kind, name = seg["kind"], seg["name"]
        fns[name] = {"stem": stem, "head": head, "full": full}.get(kind) or layer(int(seg["index"]) - 1)
    return {k: torch.inference_mode()(v) for k, v in fns.items()}


def cuda_segment_costs(model, manifest: dict, batch: int, device: torch.device, iters: int = 20) -> harness.SegmentCosts:
    """Median ms of each segment's torch computation at `batch` (CUDA events on GPU, wall clock on CPU)."""
    c = model.config
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g).to(device)
    tt = torch.rand(batch, generator=g).to(device)
    y = (torch.arange(batch) % max(1, c.num_classes)).to(device) if c.num_classes > 0 else None
    with torch.inference_mode():
        h, temb = model.stem(x, tt, y)
        saved: List[torch.Tensor] = []
        jobs = {"stem": lambda: model.stem(x, tt, y), "head": lambda: model.head(h)}
        hs = h
        for i in range(model.depth):
            src = model.skip_source(i)
            skip = saved[src] if src is not None else None
            jobs[f"layer_{i + 1}"] = (lambda i=i, hin=hs, skip=skip:
                                      model.uncertainty(i, model.layer(i, hin, skip), temb).mean(dim=(1, 2, 3)))
            hs = model.layer(i, hs, skip)
            if i < c.num_in_blocks:
                saved.append(hs)
        ms = {k: _time_ms(fn, device, iters) for k, fn in jobs.items()}
    return harness.SegmentCosts(batch, ms["stem"], [ms[f"layer_{i}"] for i in range(1, model.depth + 1)], ms["head"])


def _time_ms(fn: Callable, device: torch.device, iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
    return statistics.median(ts)


def on_device(ct: Contender, device: torch.device) -> Contender:
    """Move a torch contender's inputs to `device` once per run (its whole sampling loop then stays there)."""
    den, smp = ct.denoise, ct.sample

    def mv(v):
        return None if v is None else v.to(device)

    ct.denoise = lambda x, t, y: den(mv(x), mv(t), mv(y))
    ct.sample = lambda noise, y, n: smp(mv(noise), mv(y), n)
    return ct


def synced(ct: Contender, device: torch.device) -> Contender:
    """Make each run's time include its GPU work and bring its output to the host (as adadiff_rt's API does)."""
    def wrap(fn: Callable) -> Callable:
        def run(*a):
            out, layers = fn(*a)
            out = out.cpu()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out, layers
        return run

    ct.denoise, ct.sample = wrap(ct.denoise), wrap(ct.sample)
    return ct


def contenders(loaded: Loaded, runtime, device: torch.device, thr: float, w: float, static_layer: int,
               steps: int) -> List[Contender]:
    m, n, null = loaded.model, loaded.model.depth, loaded.model.config.num_classes
    py = dict(schedule=loaded.schedule, guidance=w, null_class=null)
    rt = dict(steps=steps, guidance=w, seed=0)
    authors = AuthorsEarlyExit(m, thr)
    cts = [
        on_device(python_contender("torch-eager", "full", m, full_depth_layers(n), **py), device),
        on_device(python_contender("torch-authors", "uem", authors, authors_layers, granularity="batch",
                                   threshold=thr, default=True,
                                   note="head+UEM at every layer, one decision per batch", **py), device),
        rt_contender(runtime, RtSetting("uem", 0.0), note=f"dlpack engine (torch segments) on {device.type}",
                     **rt),
        rt_contender(runtime, RtSetting("uem", thr, "sample"), default=True, **rt),
        rt_contender(runtime, RtSetting("uem", thr, "batch"), default=True, **rt),
        rt_contender(runtime, RtSetting("static", static_layer=static_layer), note="matched layer budget", **rt),
    ]
    return [synced(c, device) for c in cts]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=SHIPPED_CHECKPOINT)
    p.add_argument("--engines", type=Path, default=Path("engines"), help="engines folder (built when missing)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)

    import adadiff_rt

    device = torch.device(a.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and adadiff_rt.has_cuda):
        raise SystemExit("needs a CUDA GPU and an adadiff_rt built with CUDA (adadiff_rt.has_cuda)")
    loaded = load(a.checkpoint)
    loaded.model.to(device)
    if not engines_match(a.engines, a.checkpoint, max(a.batches)):
        from adadiff_export.export.build import build_engines

        build_engines(a.checkpoint, a.engines, max_batch=max(64, max(a.batches)), tensorrt="off", force=True)
    manifest = json.loads((a.engines / "manifest.json").read_text())
    runtime = adadiff_rt.Runtime(str(a.engines), device=a.device, engine="dlpack",
                                 segments=torch_segments(loaded.model, manifest, device))
    thr, w = default_threshold(loaded), default_guidance(loaded)
    c = loaded.model.config
    probe_noise, probe_y = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, 16, 0)
    _, used = runtime.sample(probe_noise.numpy(), probe_y.numpy(), steps=a.steps, guidance=w, policy="uem", threshold=thr)
    static_layer = max(1, int(round(float(np.mean(used)))))
    cts = contenders(loaded, runtime, device, thr, w, static_layer, a.steps)
    cfg = BenchConfig(repeats=a.repeats, warmup=1)
    rows: List[harness.Row] = []
    for workload in ("denoise", "sample"):
        for b in a.batches:
            if workload == "denoise":
                inputs = denoise_inputs(loaded, b, 0, None)
            else:
                inputs = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, b, 0)
            cell = time_cell(cts, "small", workload, b, inputs, a.steps, cfg, lambda: None)
            eff_b = b if workload == "denoise" else 2 * b
            rows += harness.finish_cell(cell, cuda_segment_costs(loaded.model, manifest, eff_b, device),
                                      full_peers=("torch-eager",))
    info = harness.machine()
    if device.type == "cuda":
        info["cpu"] = f"{torch.cuda.get_device_name()} (host: {info['cpu']})"
    command = "python scripts/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(report.markdown(rows, info, command))
    if a.json:
        a.json.write_text(json.dumps(report.to_json(rows, info), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
