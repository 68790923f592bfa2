"""Export one segment to ONNX and check the file against its spec.

We use the dynamo exporter (`torch.onnx.export(..., dynamo=True)`), the path torch 2.13 supports:
the legacy TorchScript exporter is deprecated, and in this model it leaves the token count of
`stem`'s output symbolic ("Addh_dim_1") where the contract wants it static. The dynamo exporter
gives static non-batch dimensions, keeps `F.scaled_dot_product_attention` as plain
MatMul/Softmax (which OpenVINO, onnxruntime and TensorRT all read), and its optimizer (onnxscript)
folds constants. The batch is one `torch.export.Dim("B")` shared by every input, so ONNX shows it as
the symbol `B`; see `batch_dim` for its range.
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import onnx
import torch
from torch import nn

from ..errors import UserError
from ..model.uvit import UViT
from .manifest import BATCH, Segment
from .segments import random_inputs, segment_module

OPSET = 18  # the lowest opset the dynamo exporter emits natively; >= the contract's 17

_ONNX_DTYPES: Dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
}


class ExportError(UserError, RuntimeError):
    """A segment could not be exported or its file does not match the contract."""


SEGMENT_NAME = re.compile(r"stem|head|full|layer_[0-9]+")

# torch.export specializes a dimension whose example size is 1 into a constant, so the example inputs
# always have two rows, whatever the largest batch.
EXAMPLE_BATCH = 2


def batch_dim(max_batch: int) -> "torch.export.Dim":
    """The dynamic batch dimension for engines that accept 1..max_batch rows.

    torch.export refuses a range whose min equals its max ("Cannot create Dim with inconsistent min=1,
    max=1") and needs the example batch inside it, so the range is 1..max(max_batch, EXAMPLE_BATCH). The
    graph is the same for any range (ONNX records only the symbol `B`); the manifest's max_batch is
    what a runtime enforces.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return torch.export.Dim(BATCH, min=1, max=max(max_batch, EXAMPLE_BATCH))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter prints progress and warns about things we handle; keep the build output readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(io.StringIO()):
                yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _strip_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces: they make files 10x larger and hold local paths."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.metadata_props[:]


def export_segment(model: UViT, spec: Segment, path: Path, max_batch: int,
                   uncertainty_map: bool = False, opset: int = OPSET, module: Optional[nn.Module] = None) -> None:
    """Write `spec`'s segment of `model` to `path` (one self-contained .onnx file) and check it.

    `module` replaces the segment's own module (same inputs and outputs): a probe comparing graph forms."""
    module = (module or segment_module(model, spec, uncertainty_map)).eval()
    example = tuple(random_inputs(model, spec, EXAMPLE_BATCH, torch.Generator().manual_seed(0)))
    dynamic = {ts.name: {0: batch_dim(max_batch)} for ts in spec.inputs}
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=opset, optimize=True,
                input_names=[ts.name for ts in spec.inputs], output_names=[ts.name for ts in spec.outputs],
                dynamic_shapes=dynamic, external_data=False, report=False, verify=False)
    except Exception as e:  # the exporter raises many types; one message naming the segment
        raise ExportError(f"exporting segment {spec.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    proto = program.model_proto
    _strip_metadata(proto)
    proto.producer_name = "adadiff_export"
    proto.graph.name = spec.name  # what check_onnx reads back: a file copied over another segment's is named
    onnx.save_model(proto, str(path))
    check_onnx(path, spec)


def _shape_of(vi: onnx.ValueInfoProto) -> List[object]:
    return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]


def check_onnx(path: Path, spec: Segment) -> None:
    """ONNX checker, strict shape inference, the segment the file was exported as (its graph's name), and
    names/dtypes/shapes exactly as the spec says."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
    except Exception as e:
        raise ExportError(f"segment {spec.name}: {Path(path).name} fails the ONNX checker: {e}") from None
    held = model.graph.name
    # Files exported before the graph carried the segment's name say "main_graph": nothing to compare.
    if SEGMENT_NAME.fullmatch(held) and held != spec.name:
        raise ExportError(f"segment {spec.name}: {Path(path).name} holds segment {held}, not {spec.name} "
                          "(a segment's file was replaced by another's)")
    for what, got, want in (("inputs", model.graph.input, spec.inputs), ("outputs", model.graph.output, spec.outputs)):
        got_specs = [(vi.name, _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, "?"), _shape_of(vi)) for vi in got]
        want_specs = [(ts.name, ts.dtype, list(ts.shape)) for ts in want]
        if got_specs != want_specs:
            raise ExportError(f"segment {spec.name}: {what} of {Path(path).name} are {got_specs}, the contract says {want_specs}")
