"""What the bench times: the peers (PyTorch eager, the authors' rule, onnxruntime and OpenVINO on `full`) and
adadiff_rt's settings, all behind one `Contender` interface (denoise once, sample a whole run), and the engines
folders and Runtimes they run on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..model.uvit import UViT
from ..sampling.early_exit import ExitPolicy
from ..sampling.exit_settings import TimeTable
from ..sampling.samplers import guided, sample_dpm_solver_pp
from .harness import FULL_PEERS, Row


class AuthorsEarlyExit:
    """The authors' way of computing an exit in PyTorch: head and UEM after every layer, one decision per batch
    (the oracle's `uem` at granularity `batch`; their exact patience, in blocks at the second trigger, is the
    `uem-authors` policy: this peer times the computation, not that rule)."""

    def __init__(self, model: UViT, threshold: float) -> None:
        self.model, self.threshold = model, threshold
        self.layers: List[int] = []

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        m = self.model
        h, temb = m.stem(x, t, y)
        last = {}

        def head_and_test(i: int, hi: Tensor) -> bool:
            last["eps"], last["layer"] = m.head(hi), i + 1
            return float(m.uncertainty(i, hi, temb).mean()) < self.threshold

        m.run_layers(h, head_and_test)
        self.layers.append(last["layer"])
        return last["eps"]


def onnxruntime_full(path: Path, threads: int) -> Callable:
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def fn(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        feed = {"x": x.numpy(), "t": t.float().numpy()}
        if "y" in names:
            feed["y"] = y.numpy()
        return torch.from_numpy(sess.run(["eps"], feed)[0])

    return fn


def openvino_full(path: Path, threads: int) -> Callable:
    """OpenVINO CPU on `full`, compiled for each batch size it meets (as adadiff_rt promotes a recurring batch to a
    static compile) with adadiff_rt's properties."""
    from ..export.openvino_cpu import compile_static

    compiled = {}

    def request(b: int):
        if b not in compiled:
            cm = compile_static(path, b, threads)
            compiled[b] = (cm, cm.create_infer_request(), {p.get_any_name() for p in cm.inputs})
        return compiled[b]

    def fn(x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        cm, req, names = request(x.shape[0])
        feed = {"x": x.numpy(), "t": t.float().numpy()}
        if "y" in names:
            feed["y"] = y.numpy()
        res = req.infer(feed)
        return torch.from_numpy(np.array(res[cm.output(0)]))

    return fn


@dataclass(frozen=True)
class RtSetting:
    """An adadiff_rt exit setting (policy `full` = uem at threshold 0); `table` for schedule and uem-time."""

    policy: str
    threshold: float = 0.0
    granularity: str = "sample"
    static_layer: int = 0
    table: Optional[TimeTable] = None

    @classmethod
    def of(cls, p: ExitPolicy) -> "RtSetting":
        return cls(p.kind, p.threshold, p.granularity, p.layer, p.table)

    def kwargs(self) -> Dict[str, object]:
        if self.policy == "static":
            return dict(policy="static", threshold=0.0, granularity=self.granularity, static_layer=self.static_layer)
        if self.table is not None:
            return dict(policy=self.policy, granularity=self.granularity, table=self.table.to_dict())
        return dict(policy=self.policy, threshold=self.threshold, granularity=self.granularity)


def rt_denoise(runtime, s: RtSetting) -> Callable:
    def fn(x: Tensor, t: Tensor, y: Optional[Tensor]):
        eps, exit_layer, _ = runtime.denoise(x.numpy(), t.float().numpy(), None if y is None else y.numpy(), **s.kwargs())
        return torch.as_tensor(np.asarray(eps)), np.asarray(exit_layer)

    return fn


def rt_sample(runtime, s: RtSetting, steps: int, guidance: float, seed: int) -> Callable:
    def fn(noise: Tensor, y: Optional[Tensor], n_steps: int = steps):
        img, used = runtime.sample(noise.numpy(), None if y is None else y.numpy(), sampler="dpm++",
                                   steps=n_steps, guidance=guidance, seed=seed, **s.kwargs())
        return torch.as_tensor(np.asarray(img)), np.asarray(used)

    return fn


DenoiseFn = Callable[[Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, np.ndarray]]


SampleFn = Callable[..., Tuple[Tensor, np.ndarray]]  # (noise, y, steps) -> images, layers [steps, B_eff]


@dataclass
class Contender:
    """Something that can denoise once and sample 50 steps, with a description for its rows."""

    engine: str
    policy: str
    granularity: str
    threshold: Optional[float]
    denoise: DenoiseFn
    sample: SampleFn
    static_layer: Optional[int] = None
    default: bool = False
    note: str = ""
    in_sweep: bool = False  # part of the threshold sweep (timed on the sample workload at sweep batches only)

    def row(self, model: str, workload: str, batch: int) -> Row:
        return Row(model, workload, batch, self.engine, self.policy, self.granularity, self.threshold,
                   float("nan"), float("nan"), default=self.default, static_layer=self.static_layer, note=self.note)


class _Recorder:
    """Wraps a torch denoiser and keeps the exit layers of every call."""

    def __init__(self, fn: Callable, layers_of: Callable[[Callable, int], np.ndarray]) -> None:
        self.fn, self.layers_of = fn, layers_of
        self.history: List[np.ndarray] = []

    def __call__(self, x: Tensor, t: Tensor, y: Optional[Tensor]) -> Tensor:
        eps = self.fn(x, t, y)
        self.history.append(self.layers_of(self.fn, x.shape[0]))
        return eps


def python_contender(engine: str, policy: str, fn: Callable, layers_of: Callable[[Callable, int], np.ndarray],
                     schedule, guidance: float, null_class: int, **kw) -> Contender:
    """A Python denoiser (PyTorch, onnxruntime, OpenVINO) run by the Python DPM-Solver++ loop."""
    rec = _Recorder(fn, layers_of)

    @torch.no_grad()
    def denoise(x: Tensor, t: Tensor, y: Optional[Tensor]):
        rec.history.clear()
        return rec(x, t, y), rec.history[-1]

    @torch.no_grad()
    def run_sample(noise: Tensor, y: Optional[Tensor], steps: int):
        rec.history.clear()
        img = sample_dpm_solver_pp(guided(rec, guidance, null_class), noise.clone(), schedule, steps, y=y)
        return img, np.stack(rec.history)

    return Contender(engine, policy, kw.pop("granularity", "-"), kw.pop("threshold", None), denoise, run_sample, **kw)


def full_depth_layers(n: int) -> Callable[[Callable, int], np.ndarray]:
    return lambda fn, b: np.full(b, n)


def torch_compiled(model: UViT) -> Callable:
    """`torch.compile(model)` (inductor on CPU), the first thing a PyTorch user tries; each batch size compiles
    once during warm-up."""
    compiled = torch.compile(model, dynamic=False)
    return lambda x, t, y: compiled(x, t, y)


def full_depth_peers(model: UViT, engines: Path, threads: int, schedule, guidance: float,
                     engines_used: Sequence[str] = FULL_PEERS) -> List[Contender]:
    """The full-depth peers every speedup is measured against, in `engines_used` order: PyTorch eager and
    torch.compile on the model, onnxruntime and OpenVINO (f32) on the folder's `full.onnx`."""
    make = {"torch-eager": lambda: model, "torch-compile": lambda: torch_compiled(model),
            "onnxruntime": lambda: onnxruntime_full(engines / "full.onnx", threads),
            "openvino": lambda: openvino_full(engines / "full.onnx", threads)}
    return [python_contender(name, "full", make[name](), full_depth_layers(model.depth), schedule=schedule,
                             guidance=guidance, null_class=model.config.num_classes) for name in engines_used]


def authors_layers(fn: AuthorsEarlyExit, b: int) -> np.ndarray:
    return np.full(b, fn.layers[-1])


CHAINED = "segments chained (fuse_static=False, fuse_exit=False)"


def static_contenders(runtime, chained, layer: int, note: str, **rt) -> List[Contender]:
    """Static exit at `layer` as adadiff_rt runs it (one fused OpenVINO graph) and through `chained` (a Runtime
    opened with fuse=False): what fusion buys."""
    return [rt_contender(runtime, RtSetting("static", static_layer=layer), note=note, **rt),
            rt_contender(chained, RtSetting("static", static_layer=layer), note=f"{note}; {CHAINED}", **rt)]


def rt_contender(runtime, s: RtSetting, steps: int, guidance: float, seed: int, **kw) -> Contender:
    den, smp = rt_denoise(runtime, s), rt_sample(runtime, s, steps, guidance, seed)
    policy = "full" if s.policy == "uem" and s.threshold == 0 else s.policy
    thr = s.threshold if s.policy in ("uem", "saturation") else None
    return Contender("adadiff_rt", policy, s.granularity, thr, den, lambda noise, y, n: smp(noise, y, n),
                     static_layer=s.static_layer or None, **kw)


def engines_match(folder: Path, checkpoint: Path, max_batch: int = 1) -> bool:
    """True when `folder` holds a build of this very checkpoint (by sha256) for at least `max_batch`."""
    from ..export.manifest import sha256_file

    manifest = Path(folder) / "manifest.json"
    if not manifest.exists():
        return False
    try:
        m = json.loads(manifest.read_text())
        return m["source"]["sha256"] == sha256_file(checkpoint) and int(m["max_batch"]) >= max_batch
    except (KeyError, ValueError, TypeError):
        return False


def ensure_engines(checkpoint: Path, folder: Path, max_batch: int, build_max_batch: Optional[int] = None) -> Path:
    """Reuse `folder` when it was built from this very checkpoint with at least `max_batch`; else build it (for
    `build_max_batch` when given, so other commands can reuse the folder)."""
    if engines_match(folder, checkpoint, max_batch):
        return Path(folder)
    from ..export.build import build_engines

    build_engines(checkpoint, folder, max_batch=max(max_batch, build_max_batch or 0), precision="fp32",
                  tensorrt="off", force=True)
    return Path(folder)


def open_runtime(engines: Path, threads: int, fuse: bool = True):
    """adadiff_rt on OpenVINO, f32; `fuse=False` chains the segments for every policy (no fused static graph,
    no uem exit graph)."""
    try:
        import adadiff_rt
    except ImportError as e:
        raise ValueError(f"bench needs the compiled adadiff_rt module ({e}); build it with `pip install .`") from None
    return adadiff_rt.Runtime(str(engines), device="cpu", engine="openvino", precision="fp32", threads=threads,
                              fuse_static=fuse, fuse_exit=fuse)
