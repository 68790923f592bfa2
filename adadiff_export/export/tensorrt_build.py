"""TensorRT plans for every segment, built only where `tensorrt` imports and a GPU is present.

Written against the TensorRT 10 Python API documentation (Builder, IBuilderConfig,
IOptimizationProfile, ITimingCache, OnnxParser); NOT run in our CI, which has no GPU and cannot
install TensorRT. Elsewhere `probe()` says in one line why plans are skipped.

Every engines folder also gets `trtexec.sh`: the trtexec command lines that build (from ONNX)
and profile (from the plans) each segment, useful on a TensorRT machine even when this build
skipped the plans.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from .manifest import Manifest, PlanFile, Segment, TensorRTInfo, sha256_file

TIMING_CACHE = "timing.cache"
TRTEXEC_SCRIPT = "trtexec.sh"


class TensorRTUnavailable(ValueError):
    """TensorRT plans were required (`--tensorrt on`) but cannot be built here."""


@dataclass(frozen=True)
class Probe:
    available: bool
    reason: str = ""          # why not, when not available
    version: str = ""
    gpu_arch: str = ""        # e.g. sm_90


def _gpu_arch() -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm_{major}{minor}"


def probe() -> Probe:
    """Can plans be built here? Never raises."""
    try:
        import tensorrt as trt
    except ImportError:
        return Probe(False, "the `tensorrt` Python package is not installed (it needs an NVIDIA GPU; "
                            "`pip install tensorrt` there)")
    except Exception as e:  # a broken install (missing libnvinfer) raises OSError and friends
        return Probe(False, f"`import tensorrt` failed: {type(e).__name__}: {e}")
    arch = _gpu_arch()
    if arch is None:
        return Probe(False, f"TensorRT {trt.__version__} is installed but no CUDA GPU is visible")
    return Probe(True, version=trt.__version__, gpu_arch=arch)


def _shape_triplet(seg: Segment, name: str, profile: Dict[str, int]):
    ts = next(t for t in seg.inputs if t.name == name)
    return tuple(ts.concrete(profile[k]) for k in ("min", "opt", "max"))


def _build_one(trt, logger, onnx_path: Path, seg: Segment, precision: str, profile: Dict[str, int],
               cache_bytes: bytes) -> tuple:
    """One plan; returns (plan bytes, updated timing cache bytes)."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name} (segment {seg.name}): {errors}")
    config = builder.create_builder_config()
    # fp32 parity with PyTorch needs real fp32 GEMMs; TF32 is on by default.
    config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    opt_profile = builder.create_optimization_profile()
    for ts in seg.inputs:
        opt_profile.set_shape(ts.name, *_shape_triplet(seg, ts.name, profile))
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build a plan for segment {seg.name} ({precision})")
    return bytes(plan), bytes(config.get_timing_cache().serialize())


def build_plans(folder: Path, manifest: Manifest, precision: str, profile: Dict[str, int],
                log: Callable[[str], None] = print) -> TensorRTInfo:
    """Build `<segment>.plan` for every segment in `folder`, sharing one timing cache."""
    import tensorrt as trt
    from tqdm import tqdm

    info = probe()
    logger = trt.Logger(trt.Logger.ERROR)
    cache_path = Path(folder) / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    plans: Dict[str, PlanFile] = {}
    for seg in tqdm(manifest.segments, desc=f"TensorRT {precision}", unit="plan", leave=False):
        plan, cache = _build_one(trt, logger, Path(folder) / seg.file, seg, precision, profile, cache)
        name = f"{seg.name}.plan"
        (Path(folder) / name).write_bytes(plan)
        plans[seg.name] = PlanFile(name, sha256_file(Path(folder) / name))
    cache_path.write_bytes(cache)
    log(f"built {len(plans)} TensorRT {precision} plans (TensorRT {info.version}, {info.gpu_arch}, "
        f"profile {profile['min']}/{profile['opt']}/{profile['max']})")
    return TensorRTInfo(info.version, info.gpu_arch, precision, dict(profile), plans)


def _shapes_arg(seg: Segment, batch: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in t.concrete(batch))}" for t in seg.inputs)


def trtexec_lines(manifest: Manifest, precision: str, profile: Dict[str, int]) -> list:
    """trtexec command lines: build each missing plan from ONNX, then profile each plan at opt batch."""
    flag = {"fp32": "--noTF32", "fp16": "--fp16", "bf16": "--bf16"}[precision]
    lines = []
    for seg in manifest.segments:
        shapes = {k: _shapes_arg(seg, profile[k]) for k in ("min", "opt", "max")}
        lines.append(f"[ -f {seg.name}.plan ] || " + " ".join([
            "trtexec", f"--onnx={shlex.quote(seg.file)}", f"--saveEngine={seg.name}.plan", flag,
            f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}",
            f"--timingCacheFile={TIMING_CACHE}", "--skipInference"]))
    for seg in manifest.segments:
        lines.append(" ".join([
            "trtexec", f"--loadEngine={seg.name}.plan", f"--shapes={_shapes_arg(seg, profile['opt'])}",
            "--useCudaGraph", "--noDataTransfers", "--useSpinWait", "--separateProfileRun",
            f"--exportTimes={seg.name}.times.json"]))
    return lines


def write_trtexec_script(folder: Path, manifest: Manifest, precision: str, profile: Dict[str, int]) -> Path:
    """Write `trtexec.sh` into the engines folder (run it from inside the folder)."""
    body = ["#!/bin/sh",
            "# Build and profile every segment with trtexec (TensorRT's CLI). Run from this folder.",
            f"# precision {precision}, profile min {profile['min']} opt {profile['opt']} max {profile['max']}",
            "set -e", ""] + trtexec_lines(manifest, precision, profile)
    path = Path(folder) / TRTEXEC_SCRIPT
    path.write_text("\n".join(body) + "\n")
    path.chmod(0o755)
    return path
