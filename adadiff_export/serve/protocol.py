"""The served models' tensors and the checks a request passes before it reaches the runtime.

Two models (`docs/ARCHITECTURE.md`, README "Serving"); every tensor carries Triton's batch dimension first:

- `adadiff_sample`: `noise` FP32 [C, H, W] and `label` INT64 [1] (absent when the model has no classes), optional
  `threshold` FP32 [1], `steps` INT32 [1], `guidance` FP32 [1] -> `image` FP32 [C, H, W], `layers` FP32 [1].
- `adadiff_denoise`: `x` FP32 [C, H, W], `t` FP32 [1], `label` INT64 [1], optional `threshold` FP32 [1] ->
  `eps` FP32 [C, H, W], `exit_layer` INT64 [1].

Without `threshold` a row exits by the engines folder's default policy (the manifest's `exit`); with it, by the
paper's `uem` rule at that threshold, 0 being full depth. Triton itself refuses a wrong dtype, a wrong shape, an
unknown input or a batch above `max_batch_size` (its message names the tensor); `parse_*` here refuse what only
the values show (labels out of range, NaN or Inf, a threshold outside [0, 1], steps or guidance out of range),
each with a `RequestError` naming the tensor and the rule. They check shapes and dtypes too, so that the
handlers are safe to call without Triton in front.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

SAMPLE_MODEL = "adadiff_sample"
DENOISE_MODEL = "adadiff_denoise"
# A request may ask for at most this many sampler steps: a bound on the work one request can hold a batch for.
MAX_STEPS = 1000


class RequestError(ValueError):
    """A request the server refuses: names the tensor and the rule it broke."""

    def __init__(self, tensor: str, rule: str) -> None:
        super().__init__(f"input '{tensor}': {rule}")
        self.tensor = tensor
        self.rule = rule


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output without the batch dimension (what PyTriton's `Tensor` and a client's `InferInput` need)."""

    name: str
    dtype: type
    shape: Tuple[int, ...]
    optional: bool = False

    @property
    def triton_dtype(self) -> str:
        return {np.float32: "FP32", np.int64: "INT64", np.int32: "INT32"}[self.dtype]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the protocol needs to know about the engines' model (from `Runtime.model` and `Runtime.max_batch`)."""

    in_chans: int
    img_size: int
    num_classes: int
    depth: int
    max_batch: int

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return (self.in_chans, self.img_size, self.img_size)

    @classmethod
    def of(cls, runtime) -> "ModelFacts":
        m = runtime.model
        return cls(in_chans=int(m["in_chans"]), img_size=int(m["img_size"]), num_classes=int(m["num_classes"]),
                   depth=int(runtime.depth), max_batch=int(runtime.max_batch))


def sample_inputs(f: ModelFacts) -> List[TensorSpec]:
    label = [TensorSpec("label", np.int64, (1,))] if f.conditional else []
    return [TensorSpec("noise", np.float32, f.image_shape), *label,
            TensorSpec("threshold", np.float32, (1,), optional=True),
            TensorSpec("steps", np.int32, (1,), optional=True),
            TensorSpec("guidance", np.float32, (1,), optional=True)]


def sample_outputs(f: ModelFacts) -> List[TensorSpec]:
    return [TensorSpec("image", np.float32, f.image_shape), TensorSpec("layers", np.float32, (1,))]


def denoise_inputs(f: ModelFacts) -> List[TensorSpec]:
    label = [TensorSpec("label", np.int64, (1,))] if f.conditional else []
    return [TensorSpec("x", np.float32, f.image_shape), TensorSpec("t", np.float32, (1,)), *label,
            TensorSpec("threshold", np.float32, (1,), optional=True)]


def denoise_outputs(f: ModelFacts) -> List[TensorSpec]:
    return [TensorSpec("eps", np.float32, f.image_shape), TensorSpec("exit_layer", np.int64, (1,))]


@dataclasses.dataclass(frozen=True)
class ExitChoice:
    """How a row exits: None = the engines' default policy; a number = the uem policy at that threshold."""

    threshold: Optional[float] = None

    def runtime_kwargs(self) -> Dict[str, object]:
        """Keyword arguments of `Runtime.sample` / `Runtime.denoise`. Every row exits on its own (granularity
        `sample`, whatever the manifest says), so that a row's result never depends on what shares its batch.
        Threshold 0 is full depth by definition (u < 0 never holds); it runs as the static full-depth path, which
        leaves the uncertainty modules out and gives the same exit layers and, to float rounding, the same eps."""
        if self.threshold is None:
            return {"granularity": "sample"}
        if self.threshold == 0.0:
            return {"policy": "static", "static_layer": 0, "granularity": "sample"}
        return {"policy": "uem", "threshold": self.threshold, "granularity": "sample"}


@dataclasses.dataclass(frozen=True)
class SampleParams:
    """The parameters a row shares with the rows it may be batched with."""

    exit: ExitChoice
    steps: Optional[int] = None
    guidance: Optional[float] = None

    def runtime_kwargs(self) -> Dict[str, object]:
        return {"steps": self.steps, "guidance": self.guidance, **self.exit.runtime_kwargs()}


@dataclasses.dataclass
class SampleRequest:
    noise: np.ndarray             # [b, C, H, W] float32
    label: Optional[np.ndarray]   # [b] int64, or None for an unconditional model
    params: List[SampleParams]    # one per row


@dataclasses.dataclass
class DenoiseRequest:
    x: np.ndarray                 # [b, C, H, W] float32
    t: np.ndarray                 # [b] float32
    label: Optional[np.ndarray]   # [b] int64 or None
    exits: List[ExitChoice]       # one per row


def parse_sample(request: Mapping[str, np.ndarray], f: ModelFacts) -> SampleRequest:
    """Check one `adadiff_sample` request; raises RequestError naming the first tensor that breaks a rule."""
    noise = _image(request, "noise", f)
    b = noise.shape[0]
    label = _labels(request, b, f)
    thresholds = _thresholds(request, b)
    steps = _column(request, "steps", np.int32, b)
    if steps is not None:
        bad = [int(s) for s in steps if not 1 <= s <= MAX_STEPS]
        if bad:
            raise RequestError("steps", f"{bad[0]} is outside 1..{MAX_STEPS}")
    guidance = _column(request, "guidance", np.float32, b)
    if guidance is not None:
        for w in guidance:
            if not (math.isfinite(w) and w >= 0):
                raise RequestError("guidance", f"{float(w)} is not a finite number >= 0")
            if not f.conditional and w != 1:
                raise RequestError("guidance", f"{float(w)}: an unconditional model has no guidance (send 1 or leave it out)")
    params = [SampleParams(exit=ExitChoice(None if thresholds is None else float(thresholds[i])),
                           steps=None if steps is None else int(steps[i]),
                           guidance=None if guidance is None else float(guidance[i])) for i in range(b)]
    return SampleRequest(noise=noise, label=label, params=params)


def parse_denoise(request: Mapping[str, np.ndarray], f: ModelFacts) -> DenoiseRequest:
    """Check one `adadiff_denoise` request (as parse_sample)."""
    x = _image(request, "x", f)
    b = x.shape[0]
    t = _column(request, "t", np.float32, b, required=True)
    bad = [float(v) for v in t if not (math.isfinite(v) and 0 <= v <= 1)]
    if bad:
        raise RequestError("t", f"{bad[0]} is not a time in [0, 1]")
    label = _labels(request, b, f)
    thresholds = _thresholds(request, b)
    exits = [ExitChoice(None if thresholds is None else float(thresholds[i])) for i in range(b)]
    return DenoiseRequest(x=x, t=t, label=label, exits=exits)


def _array(request: Mapping[str, np.ndarray], name: str, dtype, shape: Tuple[int, ...]) -> np.ndarray:
    a = np.asarray(request[name])
    if a.dtype != dtype:
        raise RequestError(name, f"dtype must be {np.dtype(dtype).name}, got {a.dtype.name}")
    if a.ndim != len(shape) + 1 or tuple(a.shape[1:]) != shape:
        raise RequestError(name, f"shape must be [batch, {', '.join(map(str, shape))}], got {list(a.shape)}")
    return a


def _image(request: Mapping[str, np.ndarray], name: str, f: ModelFacts) -> np.ndarray:
    if name not in request:
        raise RequestError(name, "is required")
    a = _array(request, name, np.float32, f.image_shape)
    if not 1 <= a.shape[0] <= f.max_batch:
        raise RequestError(name, f"batch {a.shape[0]} is outside 1..{f.max_batch} (the engines' max_batch)")
    finite = np.isfinite(a).reshape(a.shape[0], -1).all(axis=1)
    if not finite.all():
        raise RequestError(name, f"holds NaN or Inf (row {int(np.argmin(finite))})")
    return np.ascontiguousarray(a)


def _column(request: Mapping[str, np.ndarray], name: str, dtype, batch: int, required: bool = False) -> Optional[np.ndarray]:
    """An [b, 1] input as a [b] vector (None when absent and optional)."""
    if name not in request:
        if required:
            raise RequestError(name, "is required")
        return None
    a = _array(request, name, dtype, (1,))
    if a.shape[0] != batch:
        raise RequestError(name, f"batch {a.shape[0]} differs from the image's {batch}")
    return np.ascontiguousarray(a[:, 0])


def _labels(request: Mapping[str, np.ndarray], batch: int, f: ModelFacts) -> Optional[np.ndarray]:
    if not f.conditional:
        if "label" in request:
            raise RequestError("label", "this model is unconditional: send no label")
        return None
    y = _column(request, "label", np.int64, batch, required=True)
    bad = [int(v) for v in y if not 0 <= v <= f.num_classes]
    if bad:
        raise RequestError("label", f"{bad[0]} is outside 0..{f.num_classes} ({f.num_classes} is the null class: "
                                    "an unconditional sample)")
    return y


def _thresholds(request: Mapping[str, np.ndarray], batch: int) -> Optional[np.ndarray]:
    thr = _column(request, "threshold", np.float32, batch)
    if thr is not None:
        bad = [float(v) for v in thr if not 0 <= v <= 1]   # NaN fails too
        if bad:
            raise RequestError("threshold", f"{bad[0]} is outside [0, 1] (the uem policy's uncertainty threshold; "
                                            "0 = full depth)")
    return thr
