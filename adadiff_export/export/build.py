"""`build_engines`: checkpoint -> engines folder (ONNX segments, optional TensorRT plans, manifest).

The folder is assembled in a temporary sibling folder and renamed into place at the end, so a
failed or interrupted build (bad checkpoint, parity failure, full disk, Ctrl-C) never leaves a
half-written engines folder, and an existing folder is only replaced with `force`.
"""
from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from ..errors import UserError
from ..model.checkpoint import SHIPPED_CHECKPOINT, Loaded, load, require_finite
from ..sampling.generate import exit_defaults
from .manifest import FILENAME, PRECISIONS, Manifest, Segment, sha256_file, write

TENSORRT_MODES = ("auto", "on", "off")
PRODUCER = "adadiff_export 0.1.0"


class BuildError(UserError, RuntimeError):
    """The build could not finish; nothing was left behind."""


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 64
    opt_batch: Optional[int] = None  # TensorRT profile's opt batch; None: min(16, max_batch)
    precision: str = "fp32"
    tensorrt: str = "auto"
    uncertainty_map: bool = False
    parity_batch: int = 16

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be >= 1, got {self.max_batch}")
        if self.opt_batch is not None and not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"--opt-batch must be in 1..{self.max_batch}, got {self.opt_batch}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.tensorrt not in TENSORRT_MODES:
            raise ValueError(f"--tensorrt must be one of {TENSORRT_MODES}, got {self.tensorrt!r}")

    @property
    def profile(self) -> dict:
        opt = self.opt_batch if self.opt_batch is not None else min(16, self.max_batch)
        return {"min": 1, "opt": opt, "max": self.max_batch}


def _check_destination(out: Path, force: bool) -> None:
    """Refuse to overwrite unless forced, and even then only something that is an engines folder."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and all(p.name == ".gitkeep" for p in out.iterdir()):
        return  # an empty folder (a fresh clone's engines/) holds nothing to lose
    if not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out} exists and is not a folder; refusing to replace it even with --force")
    if any(p.name != ".gitkeep" for p in out.iterdir()) and not (out / FILENAME).is_file():
        raise FileExistsError(f"{out} is a non-empty folder without {FILENAME}; refusing to replace it "
                              "even with --force (choose another -o)")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old folder is moved aside first, then removed."""
    old: Optional[Path] = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old / out.name, out)
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def model_section(loaded: Loaded) -> dict:
    """The manifest's `model` object."""
    c = loaded.model.config
    return {**c.to_dict(), "null_class": c.num_classes if c.num_classes > 0 else None,
            "num_tokens": c.num_tokens, "num_extra_tokens": c.num_extra_tokens}


def check_runtime_memory(loaded: Loaded, opts: BuildOptions, log: Callable[[str], None]) -> None:
    """Refuse a max_batch whose adadiff_rt buffers would not fit this machine's free memory, before
    anything is exported: the runtime itself sizes them (adadiff_rt.check_memory), so the figure is the
    one a Runtime of the finished folder would check at load."""
    try:
        import adadiff_rt
    except ImportError:
        log(f"runtime memory for --max-batch {opts.max_batch} not checked: adadiff_rt cannot be imported here")
        return
    if not hasattr(adadiff_rt, "check_memory"):
        log(f"runtime memory for --max-batch {opts.max_batch} not checked: this adadiff_rt predates check_memory")
        return
    try:
        adadiff_rt.check_memory(model_section(loaded), opts.max_batch, u_map=opts.uncertainty_map)
    except (RuntimeError, ValueError) as e:
        raise BuildError(f"--max-batch {opts.max_batch}: {e}") from None


def _export_all(loaded: Loaded, tmp: Path, opts: BuildOptions, log: Callable[[str], None]) -> List[Segment]:
    from tqdm import tqdm

    from .onnx_export import export_segment
    from .segments import segment_specs

    specs = segment_specs(loaded.model, uncertainty_map=opts.uncertainty_map)
    done: List[Segment] = []
    for spec in tqdm(specs, desc="export ONNX", unit="segment", leave=False):
        name = f"{spec.name}.onnx"
        export_segment(loaded.model, spec, tmp / name, opts.max_batch, opts.uncertainty_map)
        done.append(Segment(**{**spec.__dict__, "file": name, "sha256": sha256_file(tmp / name)}))
    log(f"exported {len(done)} ONNX segments (opset {_opset()}, batch 1..{opts.max_batch})")
    return done


def _opset() -> int:
    from .onnx_export import OPSET

    return OPSET


def _check_parity(loaded: Loaded, tmp: Path, manifest: Manifest, opts: BuildOptions,
                  log: Callable[[str], None]) -> None:
    from . import parity

    batch = min(4, opts.max_batch)
    figures = parity.segment_parity(loaded.model, tmp, manifest.segments, batch=batch,
                                    uncertainty_map=opts.uncertainty_map)
    log(parity.summarize(f"parity onnxruntime vs PyTorch, {len(manifest.segments)} segments on random inputs "
                         f"(batch {batch})", figures))
    for f in figures:
        if not f.passed:
            log("  " + f.describe())
    parity.require(figures)
    ov = parity.openvino_parity(tmp, manifest, batch=batch)
    log(parity.summarize("parity OpenVINO (CPU, f32) vs onnxruntime, every segment", ov))
    parity.require(ov)
    chain = parity.chain_parity(loaded.model, loaded.schedule, tmp, manifest,
                                batch=min(opts.parity_batch, opts.max_batch))
    log(f"parity chained segments with exits vs reference early exit (batch {chain.batch}, threshold "
        f"{chain.threshold:.4g}, mean layers {chain.mean_layers:.2f}): exit mismatches {chain.exit_mismatches}, "
        f"eps normalized error {chain.figure.error:.2e}")
    parity.require_chain(chain)


def _check_plans(tmp: Path, manifest: Manifest, opts: BuildOptions, log: Callable[[str], None]) -> None:
    from . import parity

    figures = parity.tensorrt_parity(tmp, manifest, batch=opts.profile["opt"])
    log(parity.summarize(f"parity TensorRT {opts.precision} plans vs onnxruntime (batch {opts.profile['opt']})",
                         figures))
    parity.require(figures)


def build_engines(checkpoint: Optional[Path], out: Path, max_batch: int = 64, precision: str = "fp32",
                  tensorrt: str = "auto", force: bool = False, uncertainty_map: bool = False,
                  calibrate: bool = False, *, opt_batch: Optional[int] = None,
                  log: Callable[[str], None] = print, calibrate_options: Optional[dict] = None) -> Path:
    """Build an engines folder from `checkpoint` (the shipped one when None) at `out`; return `out`.

    Exports stem, layer_1..layer_N (UEM fused in), head and full to ONNX, checks each against
    PyTorch and the chained early exit against the reference, builds TensorRT plans when TensorRT
    and a GPU are present (`tensorrt="on"` requires them, `"off"` skips them), optionally
    calibrates the exit threshold, and writes `manifest.json`. Raises FileExistsError when `out`
    exists and not `force`, CheckpointError (naming the tensor) before exporting anything when a
    weight is NaN or Inf, BuildError before exporting anything when adadiff_rt's buffers for
    `max_batch` would not fit in this machine's free memory; any failure removes the temporary folder and leaves `out` untouched.
    """
    from . import tensorrt_build

    opts = BuildOptions(max_batch=max_batch, opt_batch=opt_batch, precision=precision, tensorrt=tensorrt,
                        uncertainty_map=uncertainty_map)
    out = Path(out)
    _check_destination(out, force)
    ckpt = Path(checkpoint) if checkpoint is not None else SHIPPED_CHECKPOINT
    if checkpoint is None and not ckpt.is_file():
        raise FileNotFoundError(f"the shipped checkpoint {ckpt} is missing from this installation; "
                                "pass a CHECKPOINT file to build")
    loaded = load(ckpt)
    require_finite(loaded)
    check_runtime_memory(loaded, opts, log)
    trt = tensorrt_build.probe() if opts.tensorrt != "off" else None
    if opts.tensorrt == "on" and not trt.available:
        raise tensorrt_build.TensorRTUnavailable(f"--tensorrt on: {trt.reason}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; an engines folder is ordinary shared output
        segments = _export_all(loaded, tmp, opts, log)
        manifest = Manifest(
            model=model_section(loaded), schedule=loaded.schedule.to_dict(), max_batch=opts.max_batch,
            segments=segments, source={"checkpoint": ckpt.name, "sha256": sha256_file(ckpt),
                                       "path": str(ckpt.resolve())},
            onnx={"opset": _opset(), "precision": "fp32"}, exit=exit_defaults(loaded),
            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            producer=PRODUCER)
        _check_parity(loaded, tmp, manifest, opts, log)
        if trt is None:
            log("TensorRT plans skipped: --tensorrt off")
        elif not trt.available:
            log(f"TensorRT plans skipped: {trt.reason}")
        else:
            manifest.tensorrt = tensorrt_build.build_plans(tmp, manifest, opts.precision, opts.profile, log)
            _check_plans(tmp, manifest, opts, log)
        tensorrt_build.write_trtexec_script(tmp, manifest, opts.precision, opts.profile)
        write(manifest, tmp)
        if calibrate:
            from .calibrate import calibrate_folder

            calibrate_folder(tmp, loaded, log=log, **(calibrate_options or {}))
        _publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        raise BuildError(f"build failed writing the engines folder{where}: {e.strerror or e}; "
                         f"nothing was written to {out}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"engines folder: {out} ({len(segments)} segments, manifest {FILENAME})")
    return out

