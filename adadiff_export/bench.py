"""`python -m adadiff_export bench`: every peer side by side, in one process, interleaved.

What is measured (all on this machine, medians of repeated runs after a warm-up, cases of one
(workload, batch) cell interleaved round-robin so that drifts of the machine hit every case alike):

- peers: PyTorch eager at full depth; the authors' style of early exit in PyTorch (one decision
  per batch, head and UEM evaluated at every layer); onnxruntime on `full`; OpenVINO (f32) on `full`;
- ours: adadiff_rt at threshold 0 (every layer: the cost of segmenting), a threshold sweep with
  granularity `sample` and `batch`, static exit at the matched layer budget, and saturation at the
  matched budget (through the PyTorch oracle: the runtime has no saturation policy);
- workloads: one denoiser call (`denoise`) and one whole 50-step DPM-Solver++ run with
  classifier-free guidance (`sample`), at batch 1, 8 and 64;
- the U-ViT-S/2 CIFAR-10 shape with untrained weights (speed does not depend on the weights):
  `denoise` only, small batches, static exit at the shipped model's mean layer count.

Columns: time, speedup over the fastest full-depth peer of the same cell, mean layers, the ideal
speedup from the profiled per-segment costs, efficiency (achieved / ideal), FD and class accuracy
(from a separate sampling run of `--n` images per setting; FD in the shipped classifier's feature
space, not Inception FID) and the prediction error against full depth (mse of this case's output
to PyTorch full depth on the same inputs: eps for `denoise`, images for `sample`).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .model.checkpoint import Loaded
from .model.uvit import UViT
from .sampling.early_exit import FULL_DEPTH, EarlyExitDenoiser, ExitPolicy
from .sampling.samplers import guided, sample_dpm_solver_pp

FULL_PEERS = ("torch-eager", "onnxruntime", "openvino")


# ----- configuration and rows ---------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What one bench run measures; `quick()` is the few-minutes variant."""

    checkpoint: Optional[Path] = None
    out: Path = Path("bench_out")
    denoise_batches: Tuple[int, ...] = (1, 8, 64)
    sample_batches: Tuple[int, ...] = (1, 8, 64)
    sweep_batches: Tuple[int, ...] = (8,)         # sample-workload batches that also time the sweep
    steps: int = 50
    repeats: int = 3
    warmup: int = 1
    n_quality: int = 256
    sweep: Tuple[float, ...] = (0.5, 1.0, 2.0)      # thresholds as multiples of the default
    guidance: Optional[float] = None               # None: the checkpoint's
    threshold: Optional[float] = None              # None: the checkpoint's default
    cifar: bool = True
    cifar_batches: Tuple[int, ...] = (1, 4)
    threads: int = 0
    seed: int = 0
    engines_candidates: Tuple[Path, ...] = (Path("engines"),)  # reused when built from the same checkpoint

    @staticmethod
    def quick(**kw) -> "BenchConfig":
        base = dict(denoise_batches=(1, 64), sample_batches=(1, 8), sweep_batches=(8,), repeats=2,
                    n_quality=64, sweep=(1.0, 2.0), cifar_batches=(1,))
        base.update(kw)
        return BenchConfig(**base)


RT_PROMOTE_AFTER = 3  # adadiff_rt's OpenVINO engine compiles a batch size statically on its third run


@dataclass
class Row:
    """One line of the table (and of the JSON list)."""

    model: str
    workload: str                 # denoise | sample
    batch: int
    engine: str
    policy: str                   # full | uem | static | saturation
    granularity: str              # sample | batch | "-"
    threshold: Optional[float]
    ms: float
    mean_layers: float
    speedup: float = float("nan")
    ideal_speedup: float = float("nan")
    efficiency: float = float("nan")
    fd: float = float("nan")
    accuracy: float = float("nan")
    pred_mse: float = float("nan")
    default: bool = False
    static_layer: Optional[int] = None
    note: str = ""


# ----- machine -------------------------------------------------------------------
def machine() -> Dict[str, object]:
    """CPU model and vector ISA from /proc/cpuinfo, logical CPUs, and the versions of every engine measured."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
        model = names[0] if names else model
        flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []))
    except OSError:
        pass
    # OpenVINO picks its kernels by vector ISA, and VMs of one name differ in it from host to host.
    isa = next((f for f in ("avx512_bf16", "avx512f", "avx2") if f in flags), "")
    info: Dict[str, object] = {"cpu": model, "isa": isa, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    for mod in ("onnxruntime", "openvino", "adadiff_rt"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except ImportError:
            info[mod] = None
    return info


def machine_line(info: Dict[str, object]) -> str:
    isa = f" ({info['isa']})" if info.get("isa") else ""
    return (f"{info['cpu']}{isa}, {info['logical_cpus']} logical CPUs, torch {info['torch']} ({info['torch_threads']} threads), "
            f"onnxruntime {info.get('onnxruntime')}, OpenVINO {info.get('openvino')}")


# ----- timing --------------------------------------------------------------------
@dataclass
class Case:
    """One thing to time: `run()` does the work and returns its output and the exit layers it used."""

    row: Row
    run: Callable[[], Tuple[Tensor, np.ndarray]]
    warm: Optional[Callable[[], object]] = None  # cheaper warm-up (default: `run`)
    times: List[float] = field(default_factory=list)
    output: Optional[Tensor] = None
    layers: Optional[np.ndarray] = None


def rotating_times(calls: Sequence[Callable[[], object]], repeats: int,
                   after: Callable[[], None] = lambda: None) -> List[List[float]]:
    """Seconds of each call over `repeats` rounds, the order rotating every round so none always goes first
    (load from elsewhere on a shared machine then lands on all alike); `after` runs untimed after each call."""
    times: List[List[float]] = [[] for _ in calls]
    for r in range(repeats):
        for j in range(len(calls)):
            k = (j + r) % len(calls)
            start = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - start)
            after()
    return times


def time_interleaved(cases: Sequence[Case], repeats: int, warmup: int, tick: Callable[[], None] = lambda: None) -> None:
    """Warm every case up, then run them round-robin `repeats` times (rotating who goes first)."""
    for c in cases:
        for _ in range(warmup):
            (c.warm or c.run)()

    def keep_first(c: Case) -> None:
        out, layers = c.run()
        if c.output is None:
            c.output, c.layers = out, layers

    times = rotating_times([lambda c=c: keep_first(c) for c in cases], repeats, after=tick)
    for c, t in zip(cases, times):
        c.times.extend(1e3 * x for x in t)
    for c in cases:
        c.row.ms = statistics.median(c.times)
        if c.layers is not None and c.layers.size:
            c.row.mean_layers = float(np.mean(c.layers))


# ----- peers (all `(x, t, y) -> eps` on torch tensors) ------------------------------
class AuthorsEarlyExit:
    """The authors' inference rule in PyTorch: head and UEM after every layer, one decision per batch."""

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
    from .export.openvino_cpu import compile_static

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


# ----- ours ------------------------------------------------------------------------
@dataclass(frozen=True)
class RtSetting:
    """An adadiff_rt exit setting (policy `full` = uem at threshold 0)."""

    policy: str
    threshold: float = 0.0
    granularity: str = "sample"
    static_layer: int = 0

    def kwargs(self) -> Dict[str, object]:
        if self.policy == "static":
            return dict(policy="static", threshold=0.0, granularity=self.granularity, static_layer=self.static_layer)
        return dict(policy=self.policy, threshold=self.threshold, granularity=self.granularity)


def rt_has_saturation(runtime, model_config) -> bool:
    """Whether this adadiff_rt build offers the saturation policy (older builds have uem and static only)."""
    c = model_config
    x = np.zeros((1, c.in_chans, c.img_size, c.img_size), dtype=np.float32)
    y = np.zeros(1, dtype=np.int64) if c.num_classes > 0 else None
    try:
        runtime.denoise(x, np.full(1, 0.5, dtype=np.float32), y, policy="saturation", threshold=0.0)
    except (ValueError, RuntimeError):
        return False
    return True


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


# ----- contenders: one interface over peers and ours ---------------------------------------
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


def _full_layers(n: int) -> Callable[[Callable, int], np.ndarray]:
    return lambda fn, b: np.full(b, n)


def _authors_layers(fn: AuthorsEarlyExit, b: int) -> np.ndarray:
    return np.full(b, fn.layers[-1])


def _oracle_layers(fn: EarlyExitDenoiser, b: int) -> np.ndarray:
    return fn.history[-1].numpy()


CHAINED = "segments chained (fuse_static=False, fuse_exit=False)"


def static_contenders(runtime, chained, layer: int, note: str, **rt) -> List[Contender]:
    """Static exit at `layer` as adadiff_rt runs it (one fused OpenVINO graph) and through `chained` (a Runtime
    opened with fuse=False): what fusion buys."""
    return [rt_contender(runtime, RtSetting("static", static_layer=layer), note=note, **rt),
            rt_contender(chained, RtSetting("static", static_layer=layer), note=f"{note}; {CHAINED}", **rt)]


def rt_contender(runtime, s: RtSetting, steps: int, guidance: float, seed: int, **kw) -> Contender:
    den, smp = rt_denoise(runtime, s), rt_sample(runtime, s, steps, guidance, seed)
    policy = "full" if s.policy == "uem" and s.threshold == 0 else s.policy
    thr = None if s.policy == "static" else s.threshold
    return Contender("adadiff_rt", policy, s.granularity, thr, den, lambda noise, y, n: smp(noise, y, n),
                     static_layer=s.static_layer or None, **kw)


# ----- segment costs and the ideal speedup -------------------------------------------------
@dataclass
class SegmentCosts:
    """Median latency (ms) of each segment at one batch size."""

    batch: int
    stem: float
    layers: List[float]
    head: float

    @property
    def full_depth(self) -> float:
        return self.stem + sum(self.layers) + self.head


def ideal_speedup(layers: np.ndarray, costs: SegmentCosts) -> float:
    """Full-depth segment cost over the cost of the layers actually run (rows exiting at `layers`).

    `layers` is [B] (one call) or [calls, B]; each call pays stem and head once and layer i in
    proportion to the rows still running at layer i (the cost model of per-sample compaction).
    """
    calls = np.atleast_2d(layers)
    n = len(costs.layers)
    depth = np.arange(1, n + 1)
    frac = (calls[:, :, None] >= depth[None, None, :]).mean(axis=1)  # [calls, N]
    spent = calls.shape[0] * (costs.stem + costs.head) + float((frac * np.asarray(costs.layers)).sum())
    return calls.shape[0] * costs.full_depth / spent


def profile_segments(engines: Path, batch: int, threads: int = 0) -> SegmentCosts:
    """Per-segment latency at `batch` through OpenVINO f32 (the engine adadiff_rt runs on CPU), from `profile`."""
    from .export.profile import segment_costs

    costs = segment_costs(engines, engine="openvino", batch=batch, warmup=2, iters=7, threads=threads or None)
    n = sum(1 for k in costs if k.startswith("layer_"))
    return SegmentCosts(batch, costs["stem"], [costs[f"layer_{i}"] for i in range(1, n + 1)], costs["head"])


# ----- quality: FD and accuracy of each setting from one sampling run of n images ------------------
@dataclass
class Quality:
    fd: float
    accuracy: float
    mean_layers: float
    ms_per_chunk: float   # median wall time of one 50-step run of `chunk` images (Figure 5's time axis)
    chunk: int


def measure_quality(sample_fn: SampleFn, clf, shape: Tuple[int, int, int], num_classes: int, n: int, chunk: int,
                    steps: int, seed: int) -> Quality:
    """Sample n images (labels i % classes) in chunks with `sample_fn`, then FD and class accuracy."""
    from .quality.metrics import class_accuracy, fd_to_test_set
    from .sampling.generate import noise_and_labels

    noise, labels = noise_and_labels(shape, num_classes, n, seed)
    images, layers, ms = [], [], []
    for i in range(0, n, chunk):
        sl = slice(i, min(n, i + chunk))
        start = time.perf_counter()
        img, used = sample_fn(noise[sl], None if labels is None else labels[sl], steps)
        ms.append((time.perf_counter() - start) * 1e3)
        images.append(img)
        layers.append(np.asarray(used).reshape(-1))
    images_t = torch.cat(images)
    acc = class_accuracy(clf, images_t, labels) if labels is not None else float("nan")
    return Quality(fd_to_test_set(clf, images_t), acc, float(np.concatenate(layers).mean()), statistics.median(ms), chunk)


# ----- matching saturation to a layer budget -------------------------------------------------
def match_threshold(mean_layers: Callable[[float], float], target_layers: float, iters: int = 14) -> float:
    """The threshold at which a policy exits after `target_layers` layers on average, by bisection.

    `mean_layers(threshold)` runs the policy and returns its mean exit layer; it must fall as the threshold rises
    (threshold 0 runs every layer). Saturation has to be matched on its own sampling trajectories: its scores
    along a full-depth trajectory say little about the states an early-exit trajectory reaches.
    """
    seen: Dict[float, float] = {}

    def layers(th: float) -> float:
        if th not in seen:
            seen[th] = mean_layers(th)
        return seen[th]

    lo, hi = 0.0, 1.0
    while layers(hi) > target_layers and hi < 1e6:
        lo, hi = hi, hi * 4
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if layers(mid) > target_layers:
            lo = mid
        else:
            hi = mid
    return min(seen, key=lambda th: (abs(seen[th] - target_layers), th))


# ----- engines ------------------------------------------------------------------------------
def engines_match(folder: Path, checkpoint: Path, max_batch: int = 1) -> bool:
    """True when `folder` holds a build of this very checkpoint (by sha256) for at least `max_batch`."""
    from .export.manifest import sha256_file

    manifest = Path(folder) / "manifest.json"
    if not manifest.exists():
        return False
    try:
        m = json.loads(manifest.read_text())
        return m["source"]["sha256"] == sha256_file(checkpoint) and int(m["max_batch"]) >= max_batch
    except (KeyError, ValueError, TypeError):
        return False


def ensure_engines(checkpoint: Path, folder: Path, max_batch: int) -> Path:
    """Reuse `folder` when it was built from this very checkpoint with a large enough max batch; else build it."""
    if engines_match(folder, checkpoint, max_batch):
        return Path(folder)
    from .export.build import build_engines

    build_engines(checkpoint, folder, max_batch=max_batch, precision="fp32", tensorrt="off", force=True)
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


# ----- one timing cell ------------------------------------------------------------------------
def denoise_inputs(loaded: Loaded, batch: int, seed: int, real: Optional[Tensor]) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """x_t at times spread over (0, 1]: real images noised when given (a realistic mix of exit layers)."""
    c = loaded.model.config
    g = torch.Generator().manual_seed(seed)
    shape = (batch, c.in_chans, c.img_size, c.img_size)
    x0 = real[:batch] if real is not None and real.shape[0] >= batch else torch.randn(shape, generator=g).clamp(-1, 1)
    t = torch.linspace(1.0, loaded.schedule.t_eps, batch + 2, dtype=torch.float32)[1:-1] if batch > 1 else torch.tensor([0.5])
    x = loaded.schedule.add_noise(x0, t, torch.randn(shape, generator=g))
    y = torch.arange(batch) % c.num_classes if c.num_classes > 0 else None
    return x.float(), t, y


def time_cell(contenders: Sequence[Contender], model: str, workload: str, batch: int, inputs: tuple, steps: int,
              cfg: BenchConfig, tick: Callable[[], None]) -> List[Tuple[Row, np.ndarray]]:
    """Time every contender on the same inputs, interleaved; rows with ms, mean layers and prediction error.

    Returns each row with the exit layers of its first timed run (for the ideal speedup).
    """
    # adadiff_rt compiles a static-batch variant on the third call of a batch size (and the OpenVINO peer on its
    # first): warm-up passes that point, so no compile lands in a timed run.
    cases = []
    for ct in contenders:
        if workload == "denoise":
            run = (lambda ct=ct: ct.denoise(*inputs))
            warm = (lambda run=run: [run() for _ in range(RT_PROMOTE_AFTER)])
        else:
            run = (lambda ct=ct: ct.sample(inputs[0], inputs[1], steps))
            warm = (lambda ct=ct: ct.sample(inputs[0], inputs[1], RT_PROMOTE_AFTER))
        cases.append(Case(ct.row(model, workload, batch), run, warm))
    time_interleaved(cases, cfg.repeats, cfg.warmup, tick)
    ref = next(c.output for c in cases if c.row.engine == "torch-eager" and c.row.policy == "full")
    for c in cases:
        c.row.pred_mse = float(((c.output.double() - ref.double()) ** 2).mean())
    return [(c.row, c.layers) for c in cases]


def finish_cell(cell: List[Tuple[Row, np.ndarray]], costs: SegmentCosts,
                full_peers: Sequence[str] = FULL_PEERS) -> List[Row]:
    """Speedup over the fastest full-depth peer of the cell, ideal speedup and efficiency."""
    fastest = min(r.ms for r, _ in cell if r.policy == "full" and r.engine in full_peers)
    for r, layers in cell:
        r.speedup = fastest / r.ms
        r.ideal_speedup = ideal_speedup(layers, costs)
        r.efficiency = r.speedup / r.ideal_speedup
    return [r for r, _ in cell]


# ----- the run ------------------------------------------------------------------------------------
@dataclass
class BenchResult:
    rows: List[Row]
    machine: Dict[str, object]
    quality: Dict[str, Quality]
    figures: Dict[str, Path]
    default_threshold: float
    guidance: float
    matched_layers: float


def _saturation(loaded: Loaded, runtime, rt_sat: bool, threshold: float, rt: dict, py: dict, **kw) -> Contender:
    """Saturation on adadiff_rt when it has the policy, else on the PyTorch oracle (and the note says so)."""
    if rt_sat:
        return rt_contender(runtime, RtSetting("saturation", threshold), **rt, **kw)
    why = "PyTorch oracle (this adadiff_rt has no saturation policy)"
    note = "; ".join(filter(None, [kw.pop("note", ""), why]))
    den = EarlyExitDenoiser(loaded.model, ExitPolicy("saturation", threshold=threshold))
    return python_contender("torch-oracle", "saturation", den, _oracle_layers, granularity="sample", threshold=threshold,
                            note=note, **py, **kw)


def _contenders(loaded: Loaded, engines: Path, runtime, cfg: BenchConfig, thr: float, w: float,
                static_layer: int, sat_threshold: float, sweep: Sequence[float], rt_sat: bool) -> List[Contender]:
    """Every peer and every setting of ours, in table order."""
    m, n, null = loaded.model, loaded.model.depth, loaded.model.config.num_classes
    py = dict(schedule=loaded.schedule, guidance=w, null_class=null)
    authors = AuthorsEarlyExit(m, thr)
    rt = dict(steps=cfg.steps, guidance=w, seed=cfg.seed)
    chained = open_runtime(engines, cfg.threads, fuse=False)
    out = [
        python_contender("torch-eager", "full", m, _full_layers(n), **py),
        python_contender("onnxruntime", "full", onnxruntime_full(engines / "full.onnx", cfg.threads), _full_layers(n), **py),
        python_contender("openvino", "full", openvino_full(engines / "full.onnx", cfg.threads), _full_layers(n), **py),
        python_contender("torch-authors", "uem", authors, _authors_layers, granularity="batch", threshold=thr,
                         default=True, note="head+UEM at every layer, one decision per batch", **py),
        rt_contender(runtime, RtSetting("uem", 0.0), **rt),
        rt_contender(runtime, RtSetting("uem", thr, "sample"), default=True, **rt),
        rt_contender(chained, RtSetting("uem", thr, "sample"), note=CHAINED, **rt),
        rt_contender(runtime, RtSetting("uem", thr, "batch"), default=True, **rt),
        *static_contenders(runtime, chained, static_layer, "matched layer budget", **rt),
        _saturation(loaded, runtime, rt_sat, sat_threshold, rt, py, note="matched layer budget"),
    ]
    for t in sweep:
        if t != thr:
            out.append(rt_contender(runtime, RtSetting("uem", t, "sample"), in_sweep=True, **rt))
    return out


def _quality_runs(loaded: Loaded, runtime, clf, cfg: BenchConfig, thr: float, w: float, sweep: Sequence[float],
                  rt_sat: bool, progress) -> Tuple[Dict[str, Quality], Dict[str, float]]:
    """FD/accuracy for full depth, the uem sweep (both granularities at the default), static and saturation
    matched to each uem point. Returns the qualities by key and the saturation thresholds by uem threshold."""
    from .sampling.generate import noise_and_labels

    c = loaded.model.config
    shape, chunk = (c.in_chans, c.img_size, c.img_size), min(64, cfg.n_quality)
    qa = dict(clf=clf, shape=shape, num_classes=c.num_classes, n=cfg.n_quality, chunk=chunk, steps=cfg.steps, seed=cfg.seed)
    rt = dict(steps=cfg.steps, guidance=w, seed=cfg.seed)
    py = dict(schedule=loaded.schedule, guidance=w, null_class=c.num_classes)
    q: Dict[str, Quality] = {}

    def run(key: str, sample_fn: SampleFn) -> Quality:
        progress.set_postfix_str(key)
        q[key] = measure_quality(sample_fn, **qa)
        progress.update(1)
        return q[key]

    run("full", rt_contender(runtime, RtSetting("uem", 0.0), **rt).sample)
    run(f"uem/batch/{thr:g}", rt_contender(runtime, RtSetting("uem", thr, "batch"), **rt).sample)
    probe = noise_and_labels(shape, c.num_classes, 4, cfg.seed + 7)
    sat_thr: Dict[str, float] = {}

    def saturation_layers(th: float) -> float:
        return float(np.mean(_saturation(loaded, runtime, rt_sat, th, rt, py).sample(*probe, cfg.steps)[1]))

    for t in sweep:
        layers = run(f"uem/sample/{t:g}", rt_contender(runtime, RtSetting("uem", t), **rt).sample).mean_layers
        static = max(1, min(loaded.model.depth, int(round(layers))))
        if f"static/{static}" not in q:
            run(f"static/{static}", rt_contender(runtime, RtSetting("static", static_layer=static), **rt).sample)
        st = match_threshold(saturation_layers, layers)
        sat_thr[f"{t:g}"] = st
        run(f"saturation/{t:g}", _saturation(loaded, runtime, rt_sat, st, rt, py).sample)
    return q, sat_thr


def _row_quality(r: Row, q: Dict[str, Quality], thr: float) -> Optional[Quality]:
    if r.policy == "full":
        return q.get("full")
    if r.engine == "torch-authors":
        return q.get(f"uem/batch/{thr:g}")
    if r.policy == "static":
        return q.get(f"static/{r.static_layer}")
    if r.policy == "saturation":
        return q.get(f"saturation/{thr:g}")
    return q.get(f"uem/{r.granularity}/{r.threshold:g}")


def _cells(cfg: BenchConfig) -> List[Tuple[str, int]]:
    """Whole sampling runs first, smallest and largest batch first (the headline cells), then single calls."""
    sb = sorted(cfg.sample_batches)
    order = [sb[0], sb[-1]] + sb[1:-1] if len(sb) > 1 else sb
    return [("sample", b) for b in order] + [("denoise", b) for b in cfg.denoise_batches]


def _cell_contenders(cts: Sequence[Contender], workload: str, batch: int, cfg: BenchConfig) -> List[Contender]:
    return [c for c in cts if not (c.in_sweep and workload == "sample" and batch not in cfg.sweep_batches)]


def run_small(loaded: Loaded, checkpoint: Path, cfg: BenchConfig, progress: bool = True,
              on_rows: Callable[[List[Row]], None] = lambda rows: None) -> BenchResult:
    """The whole bench on the shipped (or given) checkpoint: quality runs, timing cells, figures."""
    from tqdm import tqdm

    from .quality.metrics import load_classifier
    from .sampling.generate import default_guidance, default_threshold

    thr = cfg.threshold if cfg.threshold is not None else default_threshold(loaded)
    w = cfg.guidance if cfg.guidance is not None else default_guidance(loaded)
    sweep = sorted({round(thr * k, 6) for k in cfg.sweep} | {thr})
    guided_rows = 2 if loaded.model.config.num_classes > 0 and w != 1.0 else 1
    # adadiff_rt runs up to twice the engines' max batch (both guidance halves), so sampling batch B needs max_batch >= B
    need = max(max(cfg.denoise_batches), max(cfg.sample_batches), min(64, cfg.n_quality))
    engines = next((e for e in cfg.engines_candidates if engines_match(e, checkpoint, need)), None)
    engines = engines or ensure_engines(checkpoint, cfg.out / "engines_small", need)
    max_batch = int(json.loads((engines / "manifest.json").read_text())["max_batch"])
    runtime = open_runtime(engines, cfg.threads)
    clf = load_classifier()
    rt_sat = rt_has_saturation(runtime, loaded.model.config)
    n_quality_runs = 2 + 3 * len(sweep)
    bar = tqdm(total=n_quality_runs, desc="quality", disable=not progress, dynamic_ncols=True)
    quality, sat_thr = _quality_runs(loaded, runtime, clf, cfg, thr, w, sweep, rt_sat, bar)
    bar.close()
    figs = _figures(loaded, quality, thr, w, sat_thr, cfg, "adadiff_rt" if rt_sat else "PyTorch oracle")
    matched = quality[f"uem/sample/{thr:g}"].mean_layers
    static_layer = max(1, min(loaded.model.depth, int(round(matched))))
    cts = _contenders(loaded, engines, runtime, cfg, thr, w, static_layer, sat_thr[f"{thr:g}"], sweep, rt_sat)
    real = _real_images(loaded)
    rows: List[Row] = []
    total = sum(len(_cell_contenders(cts, wl, b, cfg)) for wl, b in _cells(cfg)) * cfg.repeats
    bar = tqdm(total=total, desc="timing", disable=not progress, dynamic_ncols=True)
    costs: Dict[int, SegmentCosts] = {}
    c = loaded.model.config
    for workload, b in _cells(cfg):
        bar.set_postfix_str(f"{workload} batch {b}")
        if workload == "denoise":
            inputs = denoise_inputs(loaded, b, cfg.seed, real)
        else:
            from .sampling.generate import noise_and_labels

            inputs = noise_and_labels((c.in_chans, c.img_size, c.img_size), c.num_classes, b, cfg.seed)
        cell = time_cell(_cell_contenders(cts, workload, b, cfg), "small", workload, b, inputs, cfg.steps, cfg,
                         lambda: bar.update(1))
        # segments are profiled up to the engines' max batch (cost ratios barely move between 64 and 128 rows)
        eff_b = min(max_batch, b if workload == "denoise" else guided_rows * b)
        if eff_b not in costs:
            costs[eff_b] = profile_segments(engines, eff_b, threads=cfg.threads)
        rows += finish_cell(cell, costs[eff_b])
        on_rows(rows)
    bar.close()
    for r in rows:
        qq = _row_quality(r, quality, thr)
        if qq is not None:
            r.fd, r.accuracy = qq.fd, qq.accuracy
    return BenchResult(rows, machine(), quality, figs, thr, w, matched)


def _real_images(loaded: Loaded) -> Optional[Tensor]:
    """Fashion-MNIST test images for the denoise inputs when the model has that shape, else None."""
    c = loaded.model.config
    if (c.img_size, c.in_chans) != (28, 1):
        return None
    try:
        from .training.data import load_fashion_mnist

        return load_fashion_mnist("test").images[:128]
    except Exception:  # the data package is optional for timing; random images do as well
        return None


def _figures(loaded: Loaded, quality: Dict[str, Quality], thr: float, w: float, sat_thr: Dict[str, float],
             cfg: BenchConfig, saturation_engine: str) -> Dict[str, Path]:
    from . import figures as F

    pts = []
    for key, q in quality.items():
        parts = key.split("/")
        if parts[0] == "uem" and parts[1] == "sample":
            pts.append(F.TradeoffPoint("uem", float(parts[2]), q.ms_per_chunk, q.fd, q.mean_layers))
        elif parts[0] == "static":
            pts.append(F.TradeoffPoint("static", float(parts[1]), q.ms_per_chunk, q.fd, q.mean_layers))
        elif parts[0] == "saturation":
            pts.append(F.TradeoffPoint("saturation", sat_thr[parts[1]], q.ms_per_chunk, q.fd, q.mean_layers))
    full = quality["full"]
    out = {"fig5_tradeoff": F.plot_tradeoff(
        pts, cfg.out / "fig5_tradeoff.png", full.ms_per_chunk, full.fd, full_layers=float(loaded.model.depth),
        saturation_engine=saturation_engine,
        title=f"Quality vs. time, {full.chunk} images per 50-step DPM-Solver++ run (guidance {w:g})")}
    data = F.oracle_figure_data(loaded.model, loaded.schedule, thr, n=8 if cfg.n_quality < 128 else 16,
                                steps=cfg.steps, guidance=w, seed=cfg.seed)
    out.update(F.write_oracle_figures(data, cfg.out, loaded.model.depth))
    return out


def run_cifar_shape(cfg: BenchConfig, static_layer: int, progress: bool = True) -> List[Row]:
    """The U-ViT-S/2 CIFAR-10 shape, untrained: exported and timed like the shipped model (denoise only)."""
    from tqdm import tqdm

    from .model.checkpoint import load, save_untrained
    from .model.config import preset

    ckpt = save_untrained(preset("uvit-s-cifar10"), cfg.out / "uvit_s_cifar10_untrained.pt", cfg.seed)
    loaded = load(ckpt)
    engines = ensure_engines(ckpt, cfg.out / "engines_uvit_s_cifar10", max(cfg.cifar_batches))
    runtime = open_runtime(engines, cfg.threads)
    m, n = loaded.model, loaded.model.depth
    py = dict(schedule=loaded.schedule, guidance=1.0, null_class=m.config.num_classes)
    rt = dict(steps=cfg.steps, guidance=1.0, seed=cfg.seed)
    note = "untrained weights; static exit at the shipped model's mean layers"
    cts = [
        python_contender("torch-eager", "full", m, _full_layers(n), **py),
        python_contender("onnxruntime", "full", onnxruntime_full(engines / "full.onnx", cfg.threads), _full_layers(n), **py),
        python_contender("openvino", "full", openvino_full(engines / "full.onnx", cfg.threads), _full_layers(n), **py),
        rt_contender(runtime, RtSetting("uem", 0.0), **rt),
        *static_contenders(runtime, open_runtime(engines, cfg.threads, fuse=False), static_layer, note, **rt),
    ]
    rows: List[Row] = []
    bar = tqdm(total=len(cts) * cfg.repeats * len(cfg.cifar_batches), desc="uvit-s-cifar10", disable=not progress)
    for b in cfg.cifar_batches:
        cell = time_cell(cts, "uvit-s-cifar10", "denoise", b, denoise_inputs(loaded, b, cfg.seed, None), cfg.steps, cfg,
                         lambda: bar.update(1))
        rows += finish_cell(cell, profile_segments(engines, b, threads=cfg.threads))
    bar.close()
    return rows


# ----- output ----------------------------------------------------------------------------------------
COLUMNS = ("batch", "engine", "policy", "gran.", "thr.", "ms", "speedup", "layers", "ideal", "eff.", "FD", "acc.",
           "pred. mse", "note")


def _fmt(v: Optional[float], spec: str) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return format(v, spec)


def _cells_of(r: Row) -> List[str]:
    pol = f"static L{r.static_layer}" if r.policy == "static" else r.policy
    thr = _fmt(r.threshold, ".4g") if r.policy in ("uem", "saturation") else "-"
    star = " **(default)**" if r.default else ""
    return [str(r.batch), r.engine, pol + star, r.granularity, thr, _fmt(r.ms, ".1f"), _fmt(r.speedup, ".2f") + "x",
            _fmt(r.mean_layers, ".2f"), _fmt(r.ideal_speedup, ".2f") + "x", _fmt(r.efficiency, ".2f"),
            _fmt(r.fd, ".2f"), _fmt(r.accuracy * 100 if np.isfinite(r.accuracy) else r.accuracy, ".1f"),
            _fmt(r.pred_mse, ".2e"), r.note]


def markdown(rows: Sequence[Row], info: Dict[str, object], command: str) -> str:
    """One markdown table per (model, workload), with the machine and the command on top."""
    out = [f"Machine: {machine_line(info)}", "", f"Command: `{command}`", ""]
    groups: Dict[Tuple[str, str], List[Row]] = {}
    for r in rows:
        groups.setdefault((r.model, r.workload), []).append(r)
    for (model, workload), rs in groups.items():
        what = "one denoiser call" if workload == "denoise" else "one whole 50-step DPM-Solver++ run with guidance"
        out += [f"### {model}: {workload} ({what})", "", "| " + " | ".join(COLUMNS) + " |",
                "|" + "---|" * len(COLUMNS)]
        out += ["| " + " | ".join(_cells_of(r)) + " |" for r in rs]
        out.append("")
    return "\n".join(out)


GOALS = {"speedup": 1.7, "efficiency": 0.9, "fd_ratio": 1.15}  # issue 5, at the shipped default threshold


def goals(rows: Sequence[Row], batches: Sequence[int] = (1, 64)) -> List[str]:
    """The issue's goals checked on the measured rows: whole sampling run, default threshold, granularity sample."""
    lines = []
    full_fd = next((r.fd for r in rows if r.model == "small" and r.policy == "full" and np.isfinite(r.fd)), float("nan"))
    for b in batches:
        r = next((r for r in rows if r.model == "small" and r.workload == "sample" and r.batch == b
                  and r.engine == "adadiff_rt" and r.default and r.granularity == "sample"), None)
        if r is None:
            lines.append(f"batch {b}: not measured in this run")
            continue
        ratio = r.fd / full_fd if np.isfinite(full_fd) and full_fd > 0 else float("nan")
        checks = [("speedup", r.speedup, r.speedup >= GOALS["speedup"], f">= {GOALS['speedup']}x"),
                  ("efficiency", r.efficiency, r.efficiency >= GOALS["efficiency"], f">= {GOALS['efficiency']}"),
                  ("FD / full-depth FD", ratio, ratio <= GOALS["fd_ratio"], f"<= {GOALS['fd_ratio']}")]
        parts = [f"{name} {_fmt(v, '.3f')} ({'met' if ok else 'NOT met'}, goal {goal})" for name, v, ok, goal in checks]
        lines.append(f"batch {b}, threshold {r.threshold:g}, {r.mean_layers:.2f} layers: " + "; ".join(parts))
    return lines


def to_json(rows: Sequence[Row], info: Dict[str, object]) -> List[Dict[str, object]]:
    """The JSON list of rows (NaN becomes null), each naming the machine."""
    def clean(v):
        return None if isinstance(v, float) and not np.isfinite(v) else v

    return [{**{k: clean(v) for k, v in asdict(r).items()}, "machine": info["cpu"], "cores": info["logical_cpus"]}
            for r in rows]


def run(cfg: BenchConfig, command: str, json_path: Optional[Path] = None, progress: bool = True) -> BenchResult:
    """Run the bench and write bench.md, bench.json and the figures into cfg.out (and JSON to json_path)."""
    from .model.checkpoint import SHIPPED_CHECKPOINT, load

    if cfg.n_quality < 2:
        raise ValueError(f"--n must be at least 2 (FD needs a covariance), got {cfg.n_quality}")
    checkpoint = Path(cfg.checkpoint) if cfg.checkpoint is not None else SHIPPED_CHECKPOINT
    loaded = load(checkpoint)
    cfg.out.mkdir(parents=True, exist_ok=True)
    info = machine()

    def write(rows: List[Row], done: bool) -> None:
        md = markdown(rows, info, command) if done else "(partial: the run is still going)\n\n" + markdown(rows, info, command)
        md += "\nGoals (issue 5; whole sampling run, adadiff_rt at the default threshold, granularity sample):\n\n"
        md += "\n".join(f"- {line}" for line in goals(rows)) + "\n"
        (cfg.out / "bench.md").write_text(md + "\n")
        payload = json.dumps(to_json(rows, info), indent=1)
        (cfg.out / "bench.json").write_text(payload + "\n")
        if json_path is not None:
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(payload + "\n")

    res = run_small(loaded, checkpoint, cfg, progress, on_rows=lambda rows: write(rows, False))
    if cfg.cifar:
        res.rows += run_cifar_shape(cfg, max(1, int(round(res.matched_layers))), progress)
    write(res.rows, True)
    return res
