"""`manifest.json`: the contract between the exporter and the runtime (docs/MANIFEST.md).

Dataclasses for every part, `write` (atomic) and `load` (schema, version, safe file names and
sha256 of every file, each failure one `ManifestError` naming the offending entry or file).
This module needs no torch: anything that reads an engines folder can use it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..files import sha256_file, write_atomically  # noqa: F401 (sha256_file: re-exported, build and verify use it)
from ..sampling.exit_settings import ExitDefaults

FORMAT = "adadiff-engines"
VERSION = 2  # 2: exit.layer, exit.schedule and exit.uem_time (docs/MANIFEST.md)
OLDEST_VERSION = 1  # version 1 folders still load: their exit section takes the defaults of the new fields
FILENAME = "manifest.json"
BATCH = "B"  # the symbolic batch dimension in shapes
DTYPES = ("float32", "float16", "bfloat16", "int64")
KINDS = ("stem", "layer", "head", "full")
BLOCKS = ("in", "mid", "out")
PRECISIONS = ("fp32", "fp16", "bf16")


class ManifestError(ValueError):
    """An engines folder or its manifest is malformed, unsafe, or does not match its files."""


@dataclass(frozen=True)
class TensorSpec:
    """One named input or output: dtype and shape with the batch as the symbol `B`."""

    name: str
    dtype: str
    shape: Tuple[Any, ...]

    def concrete(self, batch: int) -> Tuple[int, ...]:
        """The shape with `B` replaced by `batch`."""
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorSpec":
        return cls(str(d["name"]), str(d["dtype"]), tuple(d["shape"]))


@dataclass(frozen=True)
class Segment:
    """One segment: what it computes (kind, tensors, wiring) and, once written, its file."""

    name: str
    kind: str  # stem | layer | head | full
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]
    index: Optional[int] = None      # layers: 1-based layer number (= exit layer)
    block: Optional[str] = None      # layers: in | mid | out
    skip_from: Optional[int] = None  # out layers: 1-based in layer whose h_out feeds `skip`
    file: str = ""
    sha256: str = ""

    def to_dict(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == "layer":
            d.update(index=self.index, block=self.block, skip_from=self.skip_from)
        d.update(file=self.file, sha256=self.sha256,
                 inputs=[t.to_dict() for t in self.inputs], outputs=[t.to_dict() for t in self.outputs])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Segment":
        return cls(str(d["name"]), str(d["kind"]),
                   tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                   tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                   d.get("index"), d.get("block"), d.get("skip_from"), str(d["file"]), str(d["sha256"]))


@dataclass(frozen=True)
class PlanFile:
    file: str
    sha256: str


@dataclass(frozen=True)
class TensorRTInfo:
    """TensorRT plans of one build (absent when none were built)."""

    version: str
    gpu_arch: str
    precision: str
    profile: Dict[str, int]  # {"min": 1, "opt": .., "max": ..}
    plans: Dict[str, PlanFile]

    def to_dict(self) -> Dict[str, Any]:
        return {"version": self.version, "gpu_arch": self.gpu_arch, "precision": self.precision,
                "profile": dict(self.profile), "plans": {k: asdict(v) for k, v in self.plans.items()}}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TensorRTInfo":
        return cls(str(d["version"]), str(d["gpu_arch"]), str(d["precision"]),
                   {k: int(v) for k, v in d["profile"].items()},
                   {k: PlanFile(str(v["file"]), str(v["sha256"])) for k, v in d["plans"].items()})


@dataclass(frozen=True)
class CalibrationPoint:
    """One fitted policy of a calibration run: its budget, mean layers on the calibration set and
    `shift` (the finished samples' feature mean shift against full depth; calibration/features.py).

    Version 1 folders stored a uem threshold sweep (threshold, mean layers, prediction mse, FD);
    those entries still load, with policy "uem".
    """

    policy: str = "uem"
    budget: Optional[float] = None
    mean_layers: float = 0.0
    shift: Optional[float] = None
    threshold: Optional[float] = None
    mse: Optional[float] = None
    fd: Optional[float] = None
    # The calibration samples' last step: True, x0 prediction; False, x at t_eps; None, calibrated before
    # the field existed (at t_eps).
    final_x0: Optional[bool] = None

    def to_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Manifest:
    """The whole document (docs/MANIFEST.md)."""

    model: Dict[str, Any]
    schedule: Dict[str, Any]
    max_batch: int
    segments: List[Segment]
    source: Dict[str, Any] = field(default_factory=dict)
    onnx: Dict[str, Any] = field(default_factory=lambda: {"opset": 18, "precision": "fp32"})
    tensorrt: Optional[TensorRTInfo] = None
    exit: ExitDefaults = field(default_factory=ExitDefaults)
    calibration: List[CalibrationPoint] = field(default_factory=list)
    created: str = ""
    producer: str = "adadiff_export 0.1.0"
    format: str = FORMAT
    version: int = VERSION

    @property
    def depth(self) -> int:
        return int(self.model["depth"])

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(f"no segment {name!r} in the manifest")

    def layers(self) -> List[Segment]:
        return [s for s in self.segments if s.kind == "layer"]

    def files(self) -> Iterator[Tuple[str, str, str]]:
        """(what, file, sha256) of every file the manifest names."""
        for s in self.segments:
            yield f"segment {s.name}", s.file, s.sha256
        if self.tensorrt is not None:
            for name, p in self.tensorrt.plans.items():
                yield f"TensorRT plan {name}", p.file, p.sha256

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": self.format, "version": self.version, "created": self.created, "producer": self.producer,
            "source": dict(self.source), "model": dict(self.model), "schedule": dict(self.schedule),
            "max_batch": self.max_batch, "onnx": dict(self.onnx),
            "segments": [s.to_dict() for s in self.segments],
            "tensorrt": self.tensorrt.to_dict() if self.tensorrt is not None else None,
            "exit": self.exit.to_dict(),
            "calibration": [c.to_dict() for c in self.calibration],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Manifest":
        trt = d.get("tensorrt")
        return cls(
            model=dict(d["model"]), schedule=dict(d["schedule"]), max_batch=int(d["max_batch"]),
            segments=[Segment.from_dict(s) for s in d["segments"]], source=dict(d.get("source") or {}),
            onnx=dict(d.get("onnx") or {}), tensorrt=TensorRTInfo.from_dict(trt) if trt else None,
            exit=ExitDefaults.from_dict(d.get("exit") or {}),
            calibration=[CalibrationPoint(**c) for c in d.get("calibration") or []],
            created=str(d.get("created", "")), producer=str(d.get("producer", "")),
            format=d["format"], version=d["version"],
        )


# ----- helpers ----------------------------------------------------------------------------------

def check_file_name(name: str, what: str = "file") -> str:
    """Refuse anything but a plain file name inside the folder (no '/', '\\', '..', absolute, empty)."""
    if not isinstance(name, str) or not name or name in (".", ".."):
        raise ManifestError(f"{what}: {name!r} is not a file name")
    if ("/" in name or "\\" in name or "\0" in name or PurePosixPath(name).is_absolute()
            or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive or ".." in name):
        raise ManifestError(f"{what}: {name!r} points outside the engines folder (plain file names only)")
    return name


def expected_segment_names(depth: int) -> List[str]:
    return ["stem"] + [f"layer_{i}" for i in range(1, depth + 1)] + ["head", "full"]


# ----- validation ----------------------------------------------------------------------------------

def _check_tensors(seg: Segment, conditional: bool) -> None:
    names = {
        "stem": (["x", "t", "y"] if conditional else ["x", "t"], ["h", "temb"]),
        "head": (["h"], ["eps"]),
        "full": (["x", "t", "y"] if conditional else ["x", "t"], ["eps"]),
    }
    if seg.kind == "layer":
        want_in = ["h_in", "temb"] + (["skip"] if seg.skip_from is not None else [])
        got_out = [t.name for t in seg.outputs]
        want_out = ["h_out", "u", "u_map"][: max(2, len(got_out))]
    else:
        want_in, want_out = names[seg.kind]
    got_in, got_out = [t.name for t in seg.inputs], [t.name for t in seg.outputs]
    if got_in != want_in or got_out != want_out:
        raise ManifestError(f"segment {seg.name}: tensors {got_in} -> {got_out}, the contract says {want_in} -> {want_out}")
    for t in seg.inputs + seg.outputs:
        if t.dtype not in DTYPES:
            raise ManifestError(f"segment {seg.name}: tensor {t.name} has dtype {t.dtype!r}, not one of {DTYPES}")
        if not t.shape or t.shape[0] != BATCH or not all(isinstance(d, int) and d > 0 for d in t.shape[1:]):
            raise ManifestError(f"segment {seg.name}: tensor {t.name} has shape {list(t.shape)}; "
                                f"want ['B', static dims...]")


def _check_wiring(layers: List[Segment], depth: int) -> None:
    k = depth // 2
    for seg in layers:
        i = seg.index
        block = "in" if i <= k else ("mid" if i == k + 1 else "out")
        src = 2 * k + 2 - i if block == "out" else None
        if seg.block != block or seg.skip_from != src:
            raise ManifestError(f"segment {seg.name}: block {seg.block!r} skip_from {seg.skip_from}, "
                                f"layer {i} of {depth} is block {block!r} skip_from {src}")


def validate(m: Manifest) -> None:
    """Schema checks that need no files: format, version, segment order, tensors, wiring, names."""
    if m.format != FORMAT:
        raise ManifestError(f"not an adadiff engines manifest (format {m.format!r}, want {FORMAT!r})")
    if not OLDEST_VERSION <= m.version <= VERSION:
        raise ManifestError(f"manifest version {m.version} is not supported (this code reads versions "
                            f"{OLDEST_VERSION}..{VERSION})")
    for key in ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_classes"):
        if not isinstance(m.model.get(key), int):
            raise ManifestError(f"model.{key} missing or not an integer")
    if not 1 <= m.max_batch:
        raise ManifestError(f"max_batch must be >= 1, got {m.max_batch}")
    names = [s.name for s in m.segments]
    want = expected_segment_names(m.depth)
    if names != want:
        raise ManifestError(f"segments are {names}, want {want}")
    conditional = m.model["num_classes"] > 0
    for seg in m.segments:
        if seg.kind not in KINDS:
            raise ManifestError(f"segment {seg.name}: unknown kind {seg.kind!r}")
        check_file_name(seg.file, f"segment {seg.name}")
        _check_tensors(seg, conditional)
    layers = m.layers()
    if [s.index for s in layers] != list(range(1, m.depth + 1)):
        raise ManifestError(f"layer indices are {[s.index for s in layers]}, want 1..{m.depth}")
    _check_wiring(layers, m.depth)
    try:
        m.exit.check(m.depth)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    if m.tensorrt is not None:
        if m.tensorrt.precision not in PRECISIONS:
            raise ManifestError(f"tensorrt.precision {m.tensorrt.precision!r} is not one of {PRECISIONS}")
        for name, p in m.tensorrt.plans.items():
            check_file_name(p.file, f"TensorRT plan {name}")


def check_files(m: Manifest, folder: Path) -> None:
    """Every named file exists inside `folder` and has its recorded sha256."""
    folder = Path(folder).resolve()
    for what, name, digest in m.files():
        path = folder / check_file_name(name, what)
        if path.resolve().parent != folder:  # the rule adadiff_rt applies (Manifest::verified_path)
            raise ManifestError(f"{what}: file {name} resolves to {path.resolve()}, outside the engines folder "
                                f"{folder} (a link in the folder may point only to a file in it)")
        if not path.is_file():
            raise ManifestError(f"{what}: file {name} is missing from {folder}")
        got = sha256_file(path)
        if got != digest:
            raise ManifestError(f"{what}: {name} is damaged or was changed (sha256 {got[:16]}..., "
                                f"manifest says {str(digest)[:16]}..., {path.stat().st_size} bytes)")


def write(m: Manifest, folder: Path) -> Path:
    """Write `folder/manifest.json` atomically."""
    validate(m)
    text = json.dumps(m.to_dict(), indent=2) + "\n"
    return write_atomically(Path(folder) / FILENAME, lambda tmp: tmp.write_text(text))


def load(folder: Path, check: bool = True) -> Manifest:
    """Read and validate `folder/manifest.json`; with `check`, also every file's presence and sha256."""
    folder = Path(folder)
    path = folder / FILENAME
    if not folder.is_dir():
        raise FileNotFoundError(f"engines folder {folder} does not exist (build one with `python -m adadiff_export build`)")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {FILENAME}: not an engines folder")
    try:
        raw = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path} is not a JSON object")
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an adadiff engines manifest (format {raw.get('format')!r})")
    if raw.get("version") not in range(OLDEST_VERSION, VERSION + 1):
        newer = isinstance(raw.get("version"), int) and raw["version"] > VERSION
        raise ManifestError(f"{path}: manifest version {raw.get('version')!r} is not supported (this code reads "
                            f"versions {OLDEST_VERSION}..{VERSION}; " +
                            ("update adadiff)" if newer else "rebuild the engines with `python -m adadiff_export build`)"))
    try:
        m = Manifest.from_dict(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path} is malformed: {type(e).__name__}: {e}") from None
    validate(m)
    if check:
        check_files(m, folder)
    return m
