"""What adadiff_rt checks of TensorRT plans, tested without TensorRT or a GPU (issue 17).

The TensorRT engine reads a plan's I/O tensors and profile into plain data and hands them to
`check_plan`, compares the manifest's TensorRT version and compute capability with the running ones
through `plan_target_problem`, and logs through a locked process-wide log; `register-plans` runs the
same `check_plan`. Here those are fed plain data; the TensorRT calls around them only run on a GPU
(scripts/gpu_check.sh).
"""
from __future__ import annotations

import json
import shutil

import pytest

from adadiff_export.cli import main
from adadiff_export.export import manifest as mf
from adadiff_export.export import tensorrt_build
from adadiff_export.export.build import BuildOptions
from adadiff_export.export.register_plans import RegisterError, register_plans
from conftest import tiny_model
from runtime_engines import engines, import_runtime, manifest_only, model  # noqa: F401  (fixtures)

adadiff_rt = import_runtime()

TRT = {"version": "10.9.0", "gpu_arch": "sm_90", "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 16}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return manifest_only(tiny_model(), tmp_path_factory.mktemp("trt") / "engines", 8)


def plan_of(folder, segment: str, profile=TRT["profile"]) -> dict:
    """The description TensorRT would give of a correct plan of `segment`."""
    seg = mf.Manifest.from_dict(json.loads((folder / "manifest.json").read_text())).segment(segment)
    tensors = []
    for is_input, specs in ((True, seg.inputs), (False, seg.outputs)):
        for t in specs:
            d = {"name": t.name, "input": is_input, "dtype": t.dtype, "shape": [-1, *t.concrete(1)[1:]]}
            if is_input:
                d.update({k: list(t.concrete(profile[k])) for k in ("min", "opt", "max")})
            tensors.append(d)
    return {"profiles": 1, "tensors": tensors}


def test_a_matching_plan_passes(folder):
    for segment in ("stem", "layer_1", "layer_5", "head", "full"):
        adadiff_rt.check_plan(str(folder), segment, plan_of(folder, segment), TRT)


def _edit(plan: dict, tensor: str, **changes) -> dict:
    for t in plan["tensors"]:
        if t["name"] == tensor:
            t.update(changes)
    return plan


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p["tensors"].append({"name": "extra", "input": False, "dtype": "float32", "shape": [-1]}),
     "has 5 I/O tensors, manifest.json lists 4"),
    (lambda p: p["tensors"].pop(), "has 3 I/O tensors, manifest.json lists 4"),
    (lambda p: _edit(p, "temb", name="tembx"), "tensor 'tembx' is not one of the manifest's tensors"),
    (lambda p: _edit(p, "u", input=True), "tensor 'u' is an input of the plan, an output in manifest.json"),
    (lambda p: _edit(p, "h_out", dtype="float16"), "tensor 'h_out' has dtype float16, manifest.json says float32"),
    (lambda p: _edit(p, "h_in", dtype="int8"), "tensor 'h_in' has dtype int8"),
    (lambda p: _edit(p, "h_in", shape=[-1, 18, 16]), "tensor 'h_in' has shape [-1, 18, 16], manifest.json says [B, 18, 32]"),
    (lambda p: _edit(p, "u", shape=[4]), "tensor 'u' has shape [4]"),
    (lambda p: _edit(p, "temb", max=[8, 32]), "input 'temb': the profile's max shape is [8, 32], manifest.json's "
                                              "tensorrt.profile.max makes it [16, 32]"),
    (lambda p: _edit(p, "h_in", opt=[4, 18, 31]), "the profile's opt shape is [4, 18, 31]"),
    (lambda p: p.update(profiles=0), "has no optimization profile"),
])
def test_a_plan_that_differs_is_refused_naming_what(folder, mutate, message):
    plan = plan_of(folder, "layer_1")
    mutate(plan)
    with pytest.raises(RuntimeError, match="TensorRT plan layer_1.plan \\(segment layer_1\\): .*" + _re(message)):
        adadiff_rt.check_plan(str(folder), "layer_1", plan, TRT)


def _re(text: str) -> str:
    import re
    return re.escape(text)


def test_another_segments_plan_is_refused(folder):
    # layer_4 (an out block) takes a skip input: its plan in layer_1's place fails on the count.
    with pytest.raises(RuntimeError, match="has 5 I/O tensors, manifest.json lists 4"):
        adadiff_rt.check_plan(str(folder), "layer_1", plan_of(folder, "layer_4"), TRT)
    with pytest.raises(ValueError, match="has no segment 'layer_9'"):
        adadiff_rt.check_plan(str(folder), "layer_9", plan_of(folder, "layer_1"), TRT)


@pytest.mark.parametrize("recorded, lib, cc, problem", [
    ({"version": "10.9.0.34", "gpu_arch": "sm_90"}, 100900, (9, 0), ""),
    ({"version": "10.9", "gpu_arch": "sm_120"}, 100903, (12, 0), ""),  # only the recorded parts count
    ({"version": "10.9.0", "gpu_arch": "sm_90"}, 100901, (9, 0), "built by TensorRT 10.9.0, this is TensorRT 10.9.1"),
    ({"version": "10.8", "gpu_arch": "sm_90"}, 100900, (9, 0), "built by TensorRT 10.8, this is TensorRT 10.9.0"),
    ({"version": "10.9", "gpu_arch": "sm_86"}, 100900, (8, 9), "compute capability 8.6 (sm_86), this GPU is 8.9"),
    ({"version": "10.9", "gpu_arch": "sm_100"}, 100900, (12, 0), "compute capability 10.0 (sm_100), this GPU is 12.0"),
    ({"version": "10.9", "gpu_arch": ""}, 100900, (9, 0), "does not record the GPU"),
    ({"version": "10.9", "gpu_arch": "ampere"}, 100900, (8, 0), "'ampere' is not of the form sm_XY"),
    ({"version": "ten", "gpu_arch": "sm_90"}, 100900, (9, 0), "'ten' is not a TensorRT version"),
])
def test_plan_target_problem(recorded, lib, cc, problem):
    got = adadiff_rt.plan_target_problem({**TRT, **recorded}, lib, *cc)
    assert (got == "") if not problem else (problem in got), got


def test_logger_and_error_recorder_from_threads():
    threads, per = 8, 400
    d = adadiff_rt._log_from_threads(threads, per)
    # Every warning and error kept exactly once and whole (info is not kept), none torn or lost.
    assert d["count"] == threads * per
    want = {f"{['internal error', 'error', 'warning'][i % 3]}: thread {k} message {i}"
            for k in range(threads) for i in range(per)}
    assert len(d["recent"]) == threads * per and set(d["recent"]) == want
    # The recorder keeps the first 32 and says that more were dropped.
    assert d["errors"] == 32 and d["overflowed"]
    assert d["error_message"].count("code ") == 32 and d["error_message"].endswith("(more errors were dropped)")


def test_tensorrt_log_is_there_without_tensorrt():
    assert isinstance(adadiff_rt.tensorrt_log(), list)
    assert adadiff_rt.tensorrt_version == 0 or adadiff_rt.has_tensorrt


def test_build_profile_holds_guided_sampling():
    # Guided sampling runs 2B rows in one call: the plans must take twice max_batch.
    assert BuildOptions(max_batch=8).profile == {"min": 1, "opt": 8, "max": 16}
    assert BuildOptions(max_batch=64, opt_batch=32).profile == {"min": 1, "opt": 32, "max": 128}


@pytest.fixture
def copy(engines, tmp_path):  # noqa: F811
    out = tmp_path / "engines"
    shutil.copytree(engines, out)
    return out


def test_register_plans_refuses_a_folder_without_plans(copy):
    with pytest.raises(RegisterError, match="holds no <segment>.plan files"):
        register_plans(copy, "fp32")
    (copy / "stem.plan").write_bytes(b"x")
    with pytest.raises(RegisterError, match="no plan for segment\\(s\\) layer_1, layer_2"):
        register_plans(copy, "fp32")


def test_register_plans_refuses_fake_plans_and_leaves_the_manifest(copy, capsys):
    before = (copy / "manifest.json").read_bytes()
    for s in mf.load(copy).segments:
        (copy / f"{s.name}.plan").write_bytes(b"not a TensorRT plan\n")
    probe = tensorrt_build.probe()
    if probe.available:  # TensorRT reads the fake and refuses it
        with pytest.raises(RegisterError, match="is not a plan TensorRT"):
            register_plans(copy, "fp32")
    else:  # nothing can read a plan here, so nothing is registered
        with pytest.raises(RegisterError, match=f"cannot check 8 plan\\(s\\) in .*stem.plan.*{_re(probe.reason)}"):
            register_plans(copy, "fp32")
    assert (copy / "manifest.json").read_bytes() == before
    assert main(["register-plans", str(copy), "--precision", "fp16"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert (copy / "manifest.json").read_bytes() == before


def test_register_plans_reads_the_precision_from_trtexec_sh(copy):
    (copy / "trtexec.sh").write_text("#!/bin/sh\n# precision bf16, profile min 1 opt 8 max 16\n")
    for s in mf.load(copy).segments:
        (copy / f"{s.name}.plan").write_bytes(b"x")
    if tensorrt_build.probe().available:
        pytest.skip("TensorRT is here: the fake plans fail on loading, not on the precision")
    (copy / "trtexec.sh").unlink()
    with pytest.raises(RegisterError, match="precision is unknown: pass --precision"):
        register_plans(copy)
