"""`python -m adadiff_export verify DIR`: is this engines folder intact and does it compute the model?

Checks, each failure one error naming the file or segment (exit status 2):
1. the manifest: format, version, schema, segment order, tensor names, skip wiring;
2. what adadiff_rt checks when it loads the folder, by adadiff_rt itself (`adadiff_rt.check_engines`,
   the runtime's own code, so verify passes no folder the runtime refuses): every tensor's shape
   against the model config, file names plain and inside the folder (a link pointing out of it is
   refused), every file's sha256 (a tampered or truncated file is named), the memory the runtime's
   buffers need for max_batch. Where adadiff_rt cannot be imported, the file checks run in Python
   and the output says that the runtime's checks did not run;
3. every ONNX file passes the ONNX checker and declares the manifest's tensors;
4. parity through onnxruntime: the segments chained at full depth against `full.onnx`; and, when
   the source checkpoint is at hand (`--checkpoint`, or the path recorded at build time with the
   same sha256), every segment against PyTorch and the chained early exit against the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from .manifest import Manifest, ManifestError, check_files, load, sha256_file


@dataclass
class VerifyReport:
    manifest: Manifest
    lines: List[str] = field(default_factory=list)


def source_checkpoint(manifest: Manifest, checkpoint: Optional[Path] = None) -> Optional[Path]:
    """The checkpoint this folder was built from, if it can be found; `checkpoint` must match its sha256."""
    want = manifest.source.get("sha256")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        if want and sha256_file(checkpoint) != want:
            raise ManifestError(f"checkpoint {checkpoint} is not the one this folder was built from "
                                f"(sha256 differs from the manifest's source.sha256)")
        return checkpoint
    recorded = manifest.source.get("path")
    if recorded and Path(recorded).is_file() and want and sha256_file(Path(recorded)) == want:
        return Path(recorded)
    from ..model.checkpoint import SHIPPED_CHECKPOINT

    if want and SHIPPED_CHECKPOINT.is_file() and sha256_file(SHIPPED_CHECKPOINT) == want:
        return SHIPPED_CHECKPOINT
    return None


def _size(n: Optional[int]) -> str:
    """Bytes in binary units, as adadiff_rt writes them ("1.5 MiB"); None is unknown."""
    if n is None:
        return "unknown"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def runtime_checks(folder: Path, log: Callable[[str], None]) -> bool:
    """Run adadiff_rt's load-time checks on `folder` (adadiff_rt.check_engines), log what they found,
    and return True; return False, saying so, where adadiff_rt cannot be imported. Raises
    ManifestError with the runtime's own message when it refuses the folder."""
    try:
        import adadiff_rt
    except ImportError as e:
        log(f"runtime: adadiff_rt cannot be imported here ({e}): the checks it makes when it loads the folder "
            "(tensors against the model config, memory for max_batch) did NOT run; files checked in Python")
        return False
    if not hasattr(adadiff_rt, "check_engines"):
        log(f"runtime: this adadiff_rt ({adadiff_rt.__file__}) predates check_engines (reinstall: pip install .): "
            "the checks it makes when it loads the folder did NOT run; files checked in Python")
        return False
    try:
        found = adadiff_rt.check_engines(str(folder))
    except RuntimeError as e:
        raise ManifestError(f"adadiff_rt refuses {folder}: {e}") from None
    mem = found["memory"]
    log(f"runtime: adadiff_rt {adadiff_rt.__version__} accepts the folder: manifest version {found['version']}, "
        f"{found['files']} files with matching sha256 inside {folder}; buffers for {mem['capacity']} rows take "
        f"{_size(mem['needed'])}, {_size(mem['free'])} free ({mem['source']})")
    return True


def _check_onnx_files(folder: Path, manifest: Manifest) -> None:
    from .onnx_export import ExportError, check_onnx

    for seg in manifest.segments:
        try:
            check_onnx(folder / seg.file, seg)
        except ExportError as e:  # its message names the segment and the file
            raise ManifestError(str(e)) from None


def verify(folder: Path, checkpoint: Optional[Path] = None, parity: bool = True,
           log: Callable[[str], None] = print) -> VerifyReport:
    """Run every check on `folder`; raise ManifestError/ParityError on the first failure."""
    from . import parity as par

    folder = Path(folder)
    manifest = load(folder, check=False)
    report = VerifyReport(manifest)

    def say(line: str) -> None:
        report.lines.append(line)
        log(line)

    say(f"manifest: format {manifest.format} version {manifest.version}, {len(manifest.segments)} segments, "
        f"depth {manifest.depth}, max batch {manifest.max_batch}")
    if not runtime_checks(folder, say):
        check_files(manifest, folder)
        say(f"files: {sum(1 for _ in manifest.files())} files present with matching sha256, names inside {folder}")
    _check_onnx_files(folder, manifest)
    say("onnx: every segment passes the ONNX checker and declares the manifest's tensors")
    if manifest.tensorrt is None:
        say("tensorrt: no plans in this folder")
    else:
        say(f"tensorrt: {len(manifest.tensorrt.plans)} plans ({manifest.tensorrt.precision}, TensorRT "
            f"{manifest.tensorrt.version}, {manifest.tensorrt.gpu_arch}); checksums only, not run here")
    if not parity:
        return report
    fig = par.full_chain_parity(folder, manifest, batch=min(4, manifest.max_batch))
    say(f"parity: segments chained at full depth vs full.onnx (onnxruntime): normalized error {fig.error:.2e} "
        f"(tolerance {fig.tolerance:.0e})")
    par.require([fig])
    ov = par.openvino_parity(folder, manifest, batch=min(4, manifest.max_batch), seed=1)
    say(par.summarize("parity: every segment through OpenVINO (CPU, f32) vs onnxruntime", ov))
    par.require(ov)
    ckpt = source_checkpoint(manifest, checkpoint)
    if ckpt is None:
        say("parity vs PyTorch skipped: the source checkpoint is not at hand (pass --checkpoint)")
        return report
    from ..model.checkpoint import load as load_checkpoint

    loaded = load_checkpoint(ckpt)
    figures = par.segment_parity(loaded.model, folder, manifest.segments, batch=min(4, manifest.max_batch),
                                 seed=1, uncertainty_map=any(len(s.outputs) == 3 for s in manifest.layers()))
    say(par.summarize(f"parity: every segment vs PyTorch ({ckpt.name})", figures))
    par.require(figures)
    chain = par.chain_parity(loaded.model, loaded.schedule, folder, manifest, batch=min(16, manifest.max_batch), seed=1)
    say(f"parity: chained early exit vs reference (threshold {chain.threshold:.4g}): exit mismatches "
        f"{chain.exit_mismatches}/{chain.batch}, eps normalized error {chain.figure.error:.2e}")
    par.require_chain(chain)
    return report
