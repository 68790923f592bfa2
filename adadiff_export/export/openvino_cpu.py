"""OpenVINO on CPU compiled the way adadiff_rt compiles its segments, for the Python-side peers and profiles.

adadiff_rt asks every compiled model for f32 (this CPU would otherwise silently run bf16), latency mode with
one stream and the given thread count, and compiles a static-batch variant for a batch size that recurs. A
peer or a profile compiled any other way would compare unlike with like.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence


def config(threads: Optional[int] = None) -> Dict[str, object]:
    """The compile properties adadiff_rt uses (threads 0/None: OpenVINO's default)."""
    cfg: Dict[str, object] = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def compile_static(path: Path, batch: int, threads: Optional[int] = None, extra: Optional[Dict[str, object]] = None,
                   drop_outputs: Sequence[str] = ()):
    """`path` (ONNX with a dynamic batch) compiled for exactly `batch` rows, with `extra` properties on top
    (e.g. PERF_COUNT) and without the outputs named in `drop_outputs` (OpenVINO then drops what only they
    needed); returns the ov.CompiledModel."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path))
    for r in list(model.get_results()):
        if r.output(0).get_names() & set(drop_outputs):
            model.remove_result(r)
    static_batch(model, batch)
    return core.compile_model(model, "CPU", {**config(threads), **(extra or {})})


def static_batch(model, batch: int) -> None:
    """Reshapes `model` (an ov.Model) in place so every input with a batch dimension has exactly `batch`
    rows; scalar inputs (a threshold, a flag) stay as they are."""
    model.reshape({p.get_any_name(): [batch] + [d.get_length() for d in list(p.get_partial_shape())[1:]]
                   for p in model.inputs if p.get_partial_shape().rank.get_length() > 0})


def bound_request(compiled, feed: Dict[str, "np.ndarray"]):
    """An infer request of `compiled` (an ov.CompiledModel) with each of its inputs bound to `feed[name]`;
    entries of `feed` the model does not take are ignored, an input `feed` lacks is a KeyError."""
    import numpy as np
    import openvino as ov

    request = compiled.create_infer_request()
    for port in compiled.inputs:
        name = port.get_any_name()
        # np.require keeps a scalar 0-d (np.ascontiguousarray would make it shape (1,))
        request.set_tensor(name, ov.Tensor(np.require(feed[name], requirements="C")))
    return request
