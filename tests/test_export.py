"""The exporter: segments, ONNX parity with PyTorch, verify, profile, calibrate, and bad input.

One tiny engines folder (8x8x1, depth 5) is built once per module; everything else reuses it or
fails before exporting anything.
"""
from __future__ import annotations

import errno
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from adadiff_export.cli import main
from adadiff_export.export import manifest as mf
from adadiff_export.export import parity, tensorrt_build
from adadiff_export.export.build import BuildError, build_engines
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.model.schedule import VPSchedule

from conftest import tiny_model
from runtime_engines import import_runtime

MAX_BATCH = 8


def _save(model, path: Path, **extra) -> Path:
    ckpt.save({"config": model.config.to_dict(), "schedule": VPSchedule().to_dict(), "ema": model.state_dict(),
               **extra}, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(engines folder, checkpoint, model, build log lines), built once."""
    root = tmp_path_factory.mktemp("export")
    model = tiny_model(uem_gain=20.0)  # spread u across samples so exits differ per sample
    path = _save(model, root / "tiny.pt", defaults={"threshold": 0.3, "guidance": 1.5})
    lines = []
    out = build_engines(path, root / "engines", max_batch=MAX_BATCH, log=lines.append)
    return out, path, model, lines


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


def test_build_writes_every_segment_and_the_manifest(built):
    out, path, _, lines = built
    names = ["stem"] + [f"layer_{i}" for i in range(1, 6)] + ["head", "full"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.onnx" for n in names] + ["manifest.json", "trtexec.sh"])
    m = mf.load(out)
    assert [s.name for s in m.segments] == names
    assert m.exit.threshold == 0.3 and m.exit.guidance == 1.5  # from the checkpoint's defaults
    assert m.source["sha256"] == mf.sha256_file(path)
    assert m.onnx["opset"] >= 17 and m.tensorrt is None
    _no_leftovers(out.parent)


def test_onnx_files_have_dynamic_batch_and_static_rest(built):
    import onnx

    out = built[0]
    for seg in mf.load(out).segments:
        g = onnx.load(str(out / seg.file)).graph
        for vi, ts in zip(list(g.input) + list(g.output), seg.inputs + seg.outputs):
            dims = [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
            assert vi.name == ts.name and dims == list(ts.shape), (seg.name, vi.name, dims)


def test_skip_wiring_of_in_mid_and_out_layers(built):
    m = mf.load(built[0])
    wiring = [(s.name, s.block, s.skip_from, [t.name for t in s.inputs]) for s in m.layers()]
    assert wiring == [
        ("layer_1", "in", None, ["h_in", "temb"]),
        ("layer_2", "in", None, ["h_in", "temb"]),
        ("layer_3", "mid", None, ["h_in", "temb"]),
        ("layer_4", "out", 2, ["h_in", "temb", "skip"]),
        ("layer_5", "out", 1, ["h_in", "temb", "skip"]),
    ]


@pytest.mark.parametrize("channels", [1, 3])
def test_the_graph_forms_equal_the_model_pieces(channels: int):
    """The exporter writes the head (one channel: the 3x3 convolution as shifted multiply-adds) and the
    UEM's mean in faster forms than the model's own; parity checks compare the engines with these forms,
    so this ties the forms to the model."""
    from dataclasses import replace

    from adadiff_export.export.segments import head, mean_uncertainty
    from adadiff_export.model.config import preset
    from adadiff_export.model.uvit import UViT

    torch.manual_seed(1)
    model = UViT(replace(preset("tiny"), in_chans=channels)).eval()
    with torch.no_grad():
        model.final_conv.weight.normal_()
        model.final_conv.bias.normal_()
        h = torch.randn(3, model.config.num_tokens, model.config.embed_dim)
        temb = torch.randn(3, model.config.embed_dim)
        want = model.head(h)
        got = head(model, h)
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        assert torch.allclose(mean_uncertainty(model, 2, h, temb), model.uncertainty(2, h, temb).mean(dim=(1, 2, 3)),
                              rtol=1e-5, atol=1e-7)


def test_segment_parity_on_fresh_inputs(built):
    out, _, model, lines = built
    assert any(line.startswith("parity onnxruntime vs PyTorch") for line in lines)
    figures = parity.segment_parity(model, out, mf.load(out).segments, batch=3, seed=7)
    assert {f.segment for f in figures} == {"stem", "layer_1", "layer_2", "layer_3", "layer_4", "layer_5", "head", "full"}
    assert max(f.error for f in figures) < parity.TOLERANCES["fp32"]


def test_parity_catches_other_weights(built):
    out, _, _, _ = built
    other = tiny_model(seed=3, uem_gain=20.0)
    figures = parity.segment_parity(other, out, mf.load(out).segments[1:2], batch=2)
    with pytest.raises(parity.ParityError, match="layer_1"):
        parity.require(figures)


def test_chained_early_exit_matches_the_reference(built):
    out, _, model, _ = built
    m = mf.load(out)
    result = parity.chain_parity(model, VPSchedule(), out, m, batch=MAX_BATCH, seed=5)
    assert result.exit_mismatches == 0
    assert result.figure.error < parity.TOLERANCES["fp32"]
    assert 1.0 < result.mean_layers < 5.0  # the separating threshold really exits some samples early


def test_tensorrt_step_says_why_it_skipped(built, tmp_path):
    probe = tensorrt_build.probe()
    if probe.available:
        pytest.skip(f"TensorRT {probe.version} and a GPU are present here")
    assert any(line.startswith("TensorRT plans skipped: ") and probe.reason in line for line in built[3])
    with pytest.raises(tensorrt_build.TensorRTUnavailable, match="--tensorrt on"):
        build_engines(built[1], tmp_path / "engines", max_batch=MAX_BATCH, tensorrt="on")
    assert not (tmp_path / "engines").exists()
    _no_leftovers(tmp_path)
    script = (built[0] / "trtexec.sh").read_text()
    assert "--loadEngine=layer_4.plan" in script and "--optShapes=h_in:8x18x32,temb:8x32,skip:8x18x32" in script


def test_verify_passes_and_catches_one_changed_byte(built, tmp_path, capsys):
    out = built[0]
    assert main(["verify", str(out)]) == 0
    assert "parity: chained early exit vs reference" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    data = bytearray((copy / "layer_4.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "layer_4.onnx").write_bytes(bytes(data))
    assert main(["verify", str(copy), "--no-parity"]) == 2
    assert "layer_4.onnx" in capsys.readouterr().err
    shutil.copy(out / "layer_4.onnx", copy / "layer_4.onnx")
    with open(copy / "head.onnx", "r+b") as f:
        f.truncate(64)
    assert main(["verify", str(copy), "--no-parity"]) == 2
    assert "head.onnx" in capsys.readouterr().err


def test_verify_names_the_segment_whose_file_holds_another_segment(built, tmp_path, capsys):
    import json

    out = built[0]
    # layer_1's file replaced by a copy of layer_2's, the manifest's checksum updated to match: every
    # checksum holds and both are in-block layers with the same tensors
    copied = tmp_path / "copied"
    shutil.copytree(out, copied)
    shutil.copy(copied / "layer_2.onnx", copied / "layer_1.onnx")
    doc = json.loads((copied / mf.FILENAME).read_text())
    next(s for s in doc["segments"] if s["name"] == "layer_1")["sha256"] = mf.sha256_file(copied / "layer_1.onnx")
    (copied / mf.FILENAME).write_text(json.dumps(doc))
    assert main(["verify", str(copied)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "segment layer_1: layer_1.onnx holds segment layer_2" in err, err
    # two segments' entries swapped in the manifest (file and checksum)
    swapped = tmp_path / "swapped"
    shutil.copytree(out, swapped)
    doc = json.loads((swapped / mf.FILENAME).read_text())
    a, b = (next(s for s in doc["segments"] if s["name"] == n) for n in ("layer_4", "layer_5"))
    (a["file"], a["sha256"]), (b["file"], b["sha256"]) = (b["file"], b["sha256"]), (a["file"], a["sha256"])
    (swapped / mf.FILENAME).write_text(json.dumps(doc))
    assert main(["verify", str(swapped), "--no-parity"]) == 2
    assert "segment layer_4: layer_5.onnx holds segment layer_5" in capsys.readouterr().err


def _edited_copy(out: Path, dst: Path, edit) -> Path:
    import json

    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("openvino_cache"))
    doc = json.loads((dst / mf.FILENAME).read_text())
    edit(doc)
    (dst / mf.FILENAME).write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("edit", [lambda d: d["model"].update(embed_dim=33), lambda d: d["model"].update(img_size=16),
                                  lambda d: d.update(max_batch=10**7)], ids=["embed_dim", "img_size", "max_batch"])
def test_verify_refuses_what_the_runtime_refuses(built, tmp_path, capsys, edit):
    """verify said OK for a folder whose manifest had an edited embed_dim or img_size, which the runtime
    then refused at load: it now runs the runtime's own load checks, so it fails with the runtime's message."""
    adadiff_rt = import_runtime()
    folder = _edited_copy(built[0], tmp_path / "edited", edit)
    with pytest.raises(RuntimeError) as refused:
        adadiff_rt.Runtime(str(folder), cache_dir="")
    assert main(["verify", str(folder), "--no-parity"]) == 2
    err = capsys.readouterr().err

    def numbers_out(text: str) -> str:  # the max_batch message names the memory free now, which moves between calls
        return re.sub(r"\d+(\.\d+)?", "#", text)

    assert err.count("\n") == 1, err
    assert numbers_out(f"adadiff_rt refuses {folder}: {refused.value}") in numbers_out(err), err


def test_verify_says_when_the_runtime_checks_did_not_run(built, tmp_path, capsys, monkeypatch):
    """Without an importable adadiff_rt, verify says that the runtime's checks did not run, and still
    checks every file in Python."""
    import sys

    monkeypatch.setitem(sys.modules, "adadiff_rt", None)  # import adadiff_rt now raises ImportError
    folder = _edited_copy(built[0], tmp_path / "copy", lambda d: None)
    assert main(["verify", str(folder), "--no-parity"]) == 0
    out = capsys.readouterr().out
    assert "runtime: adadiff_rt cannot be imported here" in out and "did NOT run" in out
    assert "files: 8 files present with matching sha256" in out
    (folder / "head.onnx").write_bytes(b"changed")
    assert main(["verify", str(folder), "--no-parity"]) == 2
    assert "head.onnx is damaged or was changed" in capsys.readouterr().err


def test_verify_reports_the_runtime_checks(built, capsys):
    import_runtime()
    assert main(["verify", str(built[0]), "--no-parity"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"runtime: adadiff_rt \S+ accepts the folder: manifest version 2, 8 files with matching sha256 "
                     r"inside .*; buffers for 16 rows take [\d.]+ KiB, [\d.]+ GiB free \(", out), out


def test_build_refuses_a_max_batch_the_runtime_could_not_hold(built, tmp_path, capsys, monkeypatch):
    """build --max-batch 10^7 used to export a folder whose runtime the OOM killer then ended: it is refused
    before anything is exported, with the memory the runtime would need."""
    from adadiff_export.export import onnx_export

    import_runtime()
    exported = []
    monkeypatch.setattr(onnx_export, "export_segment", lambda *a, **k: exported.append(a))
    out = tmp_path / "engines"
    assert main(["build", str(built[1]), "-o", str(out), "--max-batch", str(10**7)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: --max-batch 10000000: max_batch 10000000 needs " in err, err
    assert "of host memory for adadiff_rt's buffers (20000000 rows" in err
    assert exported == [] and not out.exists()
    _no_leftovers(tmp_path)


def test_profile_costs_and_cumulative_exit_cost(built):
    from adadiff_export.export.profile import exit_costs, segment_costs

    out = built[0]
    costs = segment_costs(out, "onnxruntime", batch=2, warmup=1, iters=2)
    assert set(costs) == {s.name for s in mf.load(out).segments} and all(v > 0 for v in costs.values())
    cum = exit_costs(costs, 5)
    assert cum[0] == pytest.approx(costs["stem"] + costs["layer_1"] + costs["head"])
    assert all(b > a for a, b in zip(cum, cum[1:]))


def test_calibrate_stores_the_fitted_policies_in_the_manifest(built, tmp_path):
    """calibrate on a folder: the fitted schedule meets the budget within one layer, the best policy becomes the
    default, the curve is stored, and the engine files' checksums still hold."""
    from adadiff_export.export.calibrate import calibrate_folder

    copy = tmp_path / "engines"
    shutil.copytree(built[0], copy)
    report = calibrate_folder(copy, checkpoint=built[1], target_layers=0.6, samples=8, bins=3,
                              policies=("schedule", "uem-time", "uem"), log=lambda s: None)
    m = mf.load(copy)  # checksums still hold
    budget = 0.6 * 5
    fit = report.budgets[0]
    assert fit.budget == budget
    assert m.exit.policy == fit.best.policy.kind
    assert m.exit.schedule is not None and m.exit.schedule.bins == 3
    assert abs(fit.fits["schedule"].mean_layers - budget) <= 1.0
    assert abs(fit.fits["uem"].mean_layers - budget) <= 1.0
    assert m.exit.uem_time is not None and m.exit.threshold == fit.fits["uem"].policy.threshold
    assert {p.policy for p in m.calibration} == {"schedule", "uem-time", "uem"}
    assert all(p.budget == budget for p in m.calibration)
    assert report.final_x0 is True and all(p.final_x0 is True for p in m.calibration)  # the sampler's ending, recorded


def test_calibrate_checkpoint_writes_defaults_sample_uses(built, tmp_path):
    from adadiff_export.export.calibrate import calibrate_checkpoint
    from adadiff_export.model.checkpoint import load
    from adadiff_export.sampling.generate import exit_defaults

    out = tmp_path / "calibrated.pt"
    calibrate_checkpoint(built[1], out, target_layers=0.4, samples=6, bins=2, policies=("schedule",),
                         log=lambda s: None)
    d = exit_defaults(load(out))
    assert d.policy == "schedule" and d.schedule.bins == 2
    steps_mean = d.schedule.mean_layers([0.9, 0.1])  # one time in each bin
    assert abs(steps_mean - 2.0) <= 1.0
    assert load(out).raw["provenance"]["calibration"]["samples"] == 6


def test_uncertainty_map_output(tmp_path):
    from adadiff_export.export.onnx_export import export_segment
    from adadiff_export.export.segments import segment_specs

    model = tiny_model(uem_gain=20.0)
    spec = segment_specs(model, uncertainty_map=True)[4]  # layer_4: an out layer with a skip
    export_segment(model, spec, tmp_path / "layer_4.onnx", max_batch=4, uncertainty_map=True)
    spec = mf.Segment(**{**spec.__dict__, "file": "layer_4.onnx"})
    assert [t.name for t in spec.outputs] == ["h_out", "u", "u_map"]
    figures = parity.segment_parity(model, tmp_path, [spec], batch=2, uncertainty_map=True)
    assert [f.output for f in figures] == ["h_out", "u", "u_map"]
    parity.require(figures)


def test_max_batch_1_builds_engines_that_run_one_row(built, tmp_path):
    """`bench --quick` builds its CIFAR-shape engines with --max-batch 1; torch.export refused a batch range
    1..1 ("Cannot create Dim with inconsistent min=1, max=1")."""
    import onnx

    out = build_engines(built[1], tmp_path / "engines", max_batch=1, log=lambda _line: None)
    m = mf.load(out)
    assert m.max_batch == 1
    stem = onnx.load(str(out / m.segment("stem").file)).graph.input[0]
    assert stem.type.tensor_type.shape.dim[0].dim_param == mf.BATCH  # still the symbolic batch
    figures = parity.segment_parity(built[2], out, m.segments, batch=1, seed=3)
    assert max(f.error for f in figures) < parity.TOLERANCES["fp32"]
    if importlib.util.find_spec("adadiff_rt") is not None:  # and the runtime runs it like the oracle
        import adadiff_rt
        from runtime_engines import assert_parity, inputs

        assert_parity(adadiff_rt.Runtime(str(out), threads=1), built[2], *inputs(built[2], 1), threshold=0.3)


# ----- bad input: one clear error, exit 2, no folder and no temporary folder --------------------

def _bad_checkpoints(tmp_path: Path, good: Path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    code = tmp_path / "code.pt"
    torch.save({"format": "adadiff-checkpoint", "version": 1, "obj": np.random.default_rng()}, code)
    mismatch = tmp_path / "mismatch.pt"
    raw = torch.load(good, weights_only=True)
    raw["config"] = {**raw["config"], "embed_dim": 64}
    torch.save(raw, mismatch)
    return {"missing": (tmp_path / "nope.pt", "does not exist"), "truncated": (truncated, "truncated or corrupt"),
            "corrupt": (corrupt, "corrupt"), "needs code": (code, "needs code to unpickle"),
            "config/weights mismatch": (mismatch, "do not match")}


def test_bad_checkpoints_fail_cleanly(built, tmp_path, capsys):
    for case, (path, message) in _bad_checkpoints(tmp_path, built[1]).items():
        out = tmp_path / f"engines_{case.replace(' ', '_').replace('/', '_')}"
        assert main(["build", str(path), "-o", str(out), "--max-batch", "2"]) == 2, case
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (case, err)
        assert not out.exists()
    _no_leftovers(tmp_path)


def test_nan_weights_are_named_before_anything_is_exported(tmp_path, capsys, monkeypatch):
    from adadiff_export.export import onnx_export

    model = tiny_model()
    with torch.no_grad():
        model.blocks[2].mlp[0].weight[3, 1] = float("nan")
        model.uems[0].proj.bias[0] = float("inf")
    path = _save(model, tmp_path / "nan.pt")
    exported = []
    monkeypatch.setattr(onnx_export, "export_segment", lambda *a, **k: exported.append(a))
    out = tmp_path / "engines"
    assert main(["build", str(path), "-o", str(out), "--max-batch", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weight blocks.2.mlp.0.weight holds 1 NaN or Inf values" in err
    assert "(and 1 more tensors)" in err and "parity" not in err
    assert exported == [] and not out.exists()
    _no_leftovers(tmp_path)


def test_existing_folder_is_refused_without_force(built, capsys):
    out = built[0]
    before = mf.sha256_file(out / mf.FILENAME)
    assert main(["build", str(built[1]), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert mf.sha256_file(out / mf.FILENAME) == before


def test_an_empty_folder_is_built_into_without_force(built, tmp_path):
    (tmp_path / "engines").mkdir()
    build_engines(built[1], tmp_path / "engines", max_batch=2)
    assert (tmp_path / "engines" / mf.FILENAME).is_file()


def test_force_never_replaces_a_folder_that_is_not_an_engines_folder(built, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing"):
        build_engines(built[1], tmp_path / "home", force=True)
    assert (tmp_path / "home" / "notes.txt").read_text() == "keep me"


def _failing_export(exc: BaseException, after: int):
    calls = []

    def fake(model, spec, path, max_batch, uncertainty_map=False, opset=18):
        calls.append(spec.name)
        Path(path).write_bytes(b"partial")
        if len(calls) > after:
            raise exc
    return fake


def test_full_disk_leaves_nothing_behind(built, tmp_path, monkeypatch, capsys):
    from adadiff_export.export import onnx_export

    monkeypatch.setattr(onnx_export, "export_segment",
                        _failing_export(OSError(errno.ENOSPC, "No space left on device", "layer_2.onnx"), 2))
    out = tmp_path / "engines"
    with pytest.raises(BuildError, match="No space left on device"):
        build_engines(built[1], out, max_batch=2)
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert main(["build", str(built[1]), "-o", str(out), "--max-batch", "2"]) == 2
    assert "No space left" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_behind_and_keeps_the_old_folder(built, tmp_path, monkeypatch):
    from adadiff_export.export import onnx_export

    out = tmp_path / "engines"
    shutil.copytree(built[0], out)
    monkeypatch.setattr(onnx_export, "export_segment", _failing_export(KeyboardInterrupt(), 3))
    with pytest.raises(KeyboardInterrupt):
        build_engines(built[1], out, max_batch=2, force=True)
    mf.load(out)  # the previous folder is intact
    _no_leftovers(tmp_path)
    assert main(["build", str(built[1]), "-o", str(tmp_path / "other"), "--max-batch", "2"]) == 130
    assert not (tmp_path / "other").exists()
    _no_leftovers(tmp_path)
