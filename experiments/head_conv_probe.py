"""The model's head on OpenVINO CPU in its two graph forms, side by side.

With one image channel the model ends in a 3x3 Convolution with one input and one output channel, which
OpenVINO CPU runs at a small fraction of its usual speed. The exporter writes that convolution as nine
shifted multiply-adds instead (adadiff_export.export.segments.head). This probe exports the head of one
checkpoint both ways with the exporter's own settings, checks the two against each other (eps within
1e-5 relative), compiles both like adadiff_rt does (f32, latency, one stream, the given threads, static
batch) together with the exported `full` for scale, and times all three in rotation, call by call.

    python experiments/head_conv_probe.py                                  # shipped checkpoint, batch 1 and 64, 1 thread
    python experiments/head_conv_probe.py --checkpoint CKPT --batches 1 8 --threads 2 --rounds 100
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adadiff_export.bench.harness import machine, machine_line, rotating_times  # noqa: E402
from adadiff_export.export.onnx_export import export_segment  # noqa: E402
from adadiff_export.export.openvino_cpu import bound_request, compile_static  # noqa: E402
from adadiff_export.export.parity import max_relative_error, random_feed  # noqa: E402
from adadiff_export.export.segments import segment_specs  # noqa: E402
from adadiff_export.model import checkpoint  # noqa: E402


class ModelHead(nn.Module):
    """The model's own head, its Convolution included: the form the exporter no longer writes."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: Tensor) -> Tensor:
        return self.model.head(h)


def _request(path: Path, batch: int, threads: int, feed: Dict[str, np.ndarray]):
    """An infer request of `path` compiled for `batch` rows, its inputs bound from `feed`, run once."""
    req = bound_request(compile_static(path, batch, threads), feed)
    req.infer()
    return req


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped checkpoint")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1, help="OpenVINO CPU threads (0: its default)")
    p.add_argument("--rounds", type=int, default=200, help="timed calls of each form per batch (batch 1; fewer above)")
    a = p.parse_args(argv)
    if a.rounds < 1 or min(a.batches) < 1:
        p.error("--rounds and --batches must be >= 1")
    try:
        model = checkpoint.load(a.checkpoint).model
    except (OSError, ValueError) as e:
        p.error(str(e))
    specs = {s.name: s for s in segment_specs(model)}
    forms = {"Convolution": ModelHead(model), "multiply-adds": None}  # None: the exporter's own head
    rng = np.random.default_rng(0)
    # the head's h and full's x, t, y for each batch size
    feeds = {b: {**random_feed(specs["head"], b, rng, model.config.num_classes),
                 **random_feed(specs["full"], b, rng, model.config.num_classes)} for b in a.batches}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"head_{k}.onnx" for k, name in enumerate(forms)}
        for name, module in forms.items():
            export_segment(model, specs["head"], files[name], max(2, *a.batches), module=module)
        heads = {b: {n: _request(files[n], b, a.threads, feeds[b]) for n in forms} for b in a.batches}
        errors = {b: max_relative_error(*(r.get_output_tensor(0).data for r in heads[b].values())) for b in a.batches}
        for b, err in errors.items():
            if err > 1e-5:
                raise SystemExit(f"batch {b}: the two head forms differ by {err:.1e} (relative): not timed")
        files["full"] = Path(tmp) / "full.onnx"  # exported only once the forms agree: the slow export
        export_segment(model, specs["full"], files["full"], max(2, *a.batches))
        for b in a.batches:
            requests = {**heads[b], "full": _request(files["full"], b, a.threads, feeds[b])}
            calls = [r.infer for r in requests.values()]
            rotating_times(calls, 5)
            repeats = max(10, int(a.rounds / b ** 0.5))
            ms = {n: 1e3 * statistics.median(v) for n, v in zip(requests, rotating_times(calls, repeats))}
            rows.append((b, ms, repeats, errors[b]))
    print(f"head forms on OpenVINO CPU f32, {a.threads or 'default'} thread(s), "
          f"{a.checkpoint or 'the shipped checkpoint'}; machine: {machine_line(machine())}")
    print(f"{'batch':>5} | {'Convolution ms':>14} | {'multiply-adds ms':>16} | {'saved ms':>8} | "
          f"{'full ms':>8} | saved / full | calls | max rel. diff")
    for b, ms, repeats, err in rows:
        saved = ms["Convolution"] - ms["multiply-adds"]
        print(f"{b:>5} | {ms['Convolution']:>14.3f} | {ms['multiply-adds']:>16.3f} | {saved:>8.3f} | "
              f"{ms['full']:>8.3f} | {100 * saved / ms['full']:>11.1f}% | {repeats:>5} | {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
