"""`python -m adadiff_export verify DIR`: is this engines folder intact and does it compute the model?

Checks, each failure one error naming the file or segment (exit status 2):
1. the manifest: format, version, schema, segment order, tensor names, skip wiring;
2. file names are plain names inside the folder; every file exists and has its sha256
   (a tampered or truncated file is named);
3. every ONNX file passes the ONNX checker and declares the manifest's tensors;
4. parity through onnxruntime: the segments chained at full depth against `full.onnx`; and, when
   the source checkpoint is at hand (`--checkpoint`, or the path recorded at build time with the
   same sha256), every segment against PyTorch and the chained early exit against the reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from .manifest import Manifest, ManifestError, load, sha256_file


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
    manifest = load(folder, check=True)
    report = VerifyReport(manifest)

    def say(line: str) -> None:
        report.lines.append(line)
        log(line)

    n_files = sum(1 for _ in manifest.files())
    say(f"manifest: format {manifest.format} version {manifest.version}, {len(manifest.segments)} segments, "
        f"depth {manifest.depth}, max batch {manifest.max_batch}")
    say(f"files: {n_files} files present with matching sha256, names inside {folder}")
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
    how = ", converted in memory from the authors' format" if loaded.note else ""
    say(par.summarize(f"parity: every segment vs PyTorch ({ckpt.name}{how})", figures))
    par.require(figures)
    chain = par.chain_parity(loaded.model, loaded.schedule, folder, manifest, batch=min(16, manifest.max_batch), seed=1)
    say(f"parity: chained early exit vs reference (threshold {chain.threshold:.4g}): exit mismatches "
        f"{chain.exit_mismatches}/{chain.batch}, eps normalized error {chain.figure.error:.2e}")
    par.require_chain(chain)
    return report
