"""adadiff_rt refusing what it cannot run, on a real OpenVINO engines folder: every bad folder, file,
manifest, option, call argument and memory demand is a Python exception naming what is wrong, raised
before any long work, and none crashes (run again under ASan+UBSan by scripts/test.sh). The exit
behaviour itself is tests/test_runtime.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime_engines import MAX_BATCH, assert_parity, import_runtime, inputs
from runtime_engines import engines, model, rt  # noqa: F401 (module fixtures)

adadiff_rt = import_runtime(need_openvino=True)


# ---- errors: each a Python exception naming what is wrong; none crashes ------------------------

@pytest.fixture
def folder_copy(engines, tmp_path) -> Path:
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst, ignore=shutil.ignore_patterns("openvino_cache"))
    return dst


def _edit_manifest(folder: Path, fn) -> None:
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_missing_file_is_named(folder_copy):
    (folder_copy / "layer_3.onnx").unlink()
    with pytest.raises(RuntimeError, match=r"layer_3.*missing"):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_tampered_file_is_named(folder_copy):
    p = folder_copy / "head.onnx"
    recorded = hashlib.sha256(p.read_bytes()).hexdigest()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(RuntimeError, match=f"segment head: file head.onnx does not match its sha256 in manifest.json "
                                           f"\\(expected {recorded}, found {found}\\)"):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_manifest_of_another_version(folder_copy):
    _edit_manifest(folder_copy, lambda d: d.update(version=3))
    with pytest.raises(RuntimeError, match=r"version 3.*reads 1\.\.2.*update adadiff_rt"):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


@pytest.mark.parametrize("name", ["../head.onnx", "/etc/passwd", "sub/head.onnx", ".."])
def test_file_outside_the_folder_is_refused(folder_copy, name):
    _edit_manifest(folder_copy, lambda d: d["segments"][-2].update(file=name))
    with pytest.raises(RuntimeError, match="not a plain file name"):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_links_may_point_only_inside_the_folder(folder_copy, tmp_path):
    """A plain file name that is a symbolic link: loaded when it points to a file in the folder, refused
    when it points outside it, by the runtime as by verify (one rule: the real path's folder)."""
    from adadiff_export.export import manifest as mf

    head = folder_copy / "head.onnx"
    head.rename(folder_copy / "head.real")
    head.symlink_to("head.real")
    adadiff_rt.Runtime(str(folder_copy), cache_dir="")
    outside = tmp_path / "elsewhere.onnx"
    (folder_copy / "head.real").rename(outside)
    head.unlink()
    head.symlink_to(outside)
    message = f"segment head: file head.onnx resolves to {outside}, outside the engines folder {folder_copy}"
    with pytest.raises(RuntimeError, match=message):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")
    with pytest.raises(mf.ManifestError, match=message):
        mf.load(folder_copy)
    linked = tmp_path / "linked"
    head.unlink()
    outside.rename(head)
    linked.symlink_to(folder_copy)  # the folder itself may be a link
    adadiff_rt.Runtime(str(linked), cache_dir="")


@pytest.mark.parametrize("text,message", [
    ("", "malformed JSON: parse error at line 1, column 1: .*unexpected end of input"),
    ("{", "malformed JSON: parse error at line 1, column 2: .*unexpected end of input"),
    ('{"format": "adadiff-engines", "version": 1,}', "malformed JSON: parse error at line 1, column 44: .*unexpected '}'"),
    ('{\n  "format": "adadiff-engines",\n  "version": 1\n  "model": {}\n}', "malformed JSON: parse error at line 4, column 9: .*expected '}'"),
    ('{"format": "adadiff-engines", "version": tru}', "malformed JSON: parse error at line 1, column 45: .*invalid literal"),
    ("[1, 2]", "manifest.json: document: expected an object, got array"),
    ('{"a": 1, "a": 2}', 'manifest.json: document: duplicate key "a"'),
])
def test_malformed_manifest(folder_copy, text, message):
    """Malformed JSON is named with its position; a document that is not an object, or an object
    holding one key twice (ambiguous: which value did the exporter mean?), is refused."""
    (folder_copy / "manifest.json").write_text(text)
    with pytest.raises(RuntimeError, match=message):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_duplicate_key_names_the_object(folder_copy):
    path = folder_copy / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"depth": 5', '"depth": 5, "depth": 7', 1))
    with pytest.raises(RuntimeError, match='manifest.json: model: duplicate key "depth"'):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")
    doc = json.loads(text)
    head = next(i for i, s in enumerate(doc["segments"]) if s["name"] == "head")
    path.write_text(json.dumps(doc, indent=1).replace('"kind": "head"', '"kind": "head", "kind": "layer"'))
    with pytest.raises(RuntimeError, match=f'manifest.json: segments\\[{head}\\]: duplicate key "kind"'):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["segments"][3].update(file=7), "segment layer_3.file: expected a string, got number 7"),
    (lambda d: d["model"].update(embed_dim="32"), 'model.embed_dim: expected an integer, got string "32"'),
    (lambda d: d["model"].update(depth=5.5), "model.depth: expected an integer, got number 5.5"),
    (lambda d: d.update(max_batch=[16]), "max_batch: expected an integer, got array"),
    (lambda d: d["segments"][0]["inputs"][0].update(shape=["B", 1, "8", 8]),
     r"segment stem.inputs\[0\].shape\[2\]: only the first dimension may be symbolic"),
    (lambda d: d["exit"].update(threshold="0.1"), 'exit.threshold: expected a number, got string "0.1"'),
    (lambda d: d.update(exit=[]), "exit: expected an object, got array"),
    (lambda d: d.update(segments={}), "segments: expected an array, got object"),
    (lambda d: d.pop("schedule"), "document: missing field 'schedule'"),
])
def test_wrong_types_name_the_field(folder_copy, edit, message):
    """A value of the wrong type is named by its path and shows what was found (an exit field of the
    wrong type used to fall back to the default silently)."""
    _edit_manifest(folder_copy, edit)
    with pytest.raises(RuntimeError, match=message):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_wrong_wiring_is_refused(folder_copy):
    _edit_manifest(folder_copy, lambda d: d["segments"][4].update(skip_from=1))  # layer_4 takes layer_2
    with pytest.raises(RuntimeError, match=r"layer_4.*skip_from"):
        adadiff_rt.Runtime(str(folder_copy), cache_dir="")


def test_missing_folder():
    with pytest.raises(RuntimeError, match="manifest.json"):
        adadiff_rt.Runtime("/nonexistent/engines")


def test_bad_call_arguments(rt, model):
    x, t, y = inputs(model, 2)
    cases = [
        (dict(x=np.zeros((MAX_BATCH + 1, 1, 8, 8), np.float32), t=np.zeros(MAX_BATCH + 1, np.float32),
              y=np.zeros(MAX_BATCH + 1, np.int64)), ValueError, "batch 17 is outside 1..16"),
        (dict(x=x[:, :, :4], t=t, y=y), ValueError, r"x must have shape \(B, 1, 8, 8\)"),
        (dict(x=x.astype(np.float64), t=t, y=y), TypeError, "x must have dtype float32"),
        (dict(x=x, t=t.astype(np.float64), y=y), TypeError, "t must have dtype float32"),
        (dict(x=x, t=t, y=y.astype(np.int32)), TypeError, "y must have dtype int64"),
        (dict(x=x, t=t[:1], y=y), ValueError, r"t must have shape \(2,\)"),
        (dict(x=np.where(np.arange(2)[:, None, None, None] == 1, np.nan, x).astype(np.float32), t=t, y=y),
         ValueError, "x holds NaN or Inf"),
        (dict(x=x, t=np.array([0.5, np.inf], np.float32), y=y), ValueError, "t holds NaN or Inf"),
        (dict(x=x, t=t, y=np.array([0, 11])), ValueError, r"y\[1\] = 11 is outside 0..10"),
        (dict(x=x, t=t, y=None), ValueError, "y .* is required"),
        (dict(x=x.tolist(), t=t, y=y), TypeError, "x must be a numpy array"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            rt.denoise(**kwargs)
    for kw, msg in [(dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
                    (dict(threshold=-0.1), r"threshold must be in \[0, 1\]"),
                    (dict(threshold=float("nan")), r"threshold must be in \[0, 1\]"),
                    (dict(policy="cosine"), "policy must be one of"),
                    (dict(granularity="token"), "granularity must be"),
                    (dict(patience=0), "patience must be >= 1"),
                    (dict(policy="static", static_layer=99), "static_layer must be in 0..5")]:
        with pytest.raises(ValueError, match=msg):
            rt.denoise(x, t, y, **kw)
    noise = x
    for kw, msg in [(dict(sampler="heun"), "sampler must be one of"),
                    (dict(steps=0), "steps must be >= 1"),
                    (dict(guidance=-1.0), "guidance must be"),
                    (dict(eta=-1.0), "eta must be")]:
        with pytest.raises(ValueError, match=msg):
            rt.sample(noise, y, **kw)
    with pytest.raises(ValueError, match="batch 17 is outside 1..16"):
        rt.sample(np.zeros((17, 1, 8, 8), np.float32), np.zeros(17, np.int64), guidance=2.0, steps=1)
    # the runtime still works after every refusal
    assert_parity(rt, model, x, t, y, threshold=0.0)


def test_device_and_engine_choices(engines):
    with pytest.raises(ValueError, match="device must be"):
        adadiff_rt.Runtime(str(engines), device="tpu")
    with pytest.raises(ValueError, match="engine must be"):
        adadiff_rt.Runtime(str(engines), engine="onnxruntime")
    with pytest.raises(ValueError, match="precision must be"):
        adadiff_rt.Runtime(str(engines), precision="int8")
    with pytest.raises(ValueError, match="threads must be"):
        adadiff_rt.Runtime(str(engines), threads=-1)
    if not (adadiff_rt.has_cuda and torch.cuda.is_available()):
        with pytest.raises(RuntimeError, match="no CUDA device|built without CUDA"):
            adadiff_rt.Runtime(str(engines), device="cuda")
    with pytest.raises(ValueError, match="engine='openvino' runs on device='cpu' only"):
        adadiff_rt.Runtime(str(engines), device="cuda", engine="openvino")
    with pytest.raises(ValueError, match="engine='dlpack' runs the caller's callables"):
        adadiff_rt.Runtime(str(engines), engine="dlpack")


def test_options_an_engine_cannot_honour_are_refused(folder_copy):
    """precision and threads used to be ignored silently by TensorRT and the DLPack callables: each is
    refused, naming what the engine does instead, before any device or engine is touched."""
    plans = {s["name"]: {"file": f"{s['name']}.plan", "sha256": "0" * 64}
             for s in json.loads((folder_copy / "manifest.json").read_text())["segments"]}
    _edit_manifest(folder_copy, lambda d: d.update(tensorrt={
        "version": "10.9", "gpu_arch": "sm_90", "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 16},
        "plans": plans}))
    trt = dict(device="cuda", engine="tensorrt")
    for kw, message in [(dict(trt, precision="fp32"), "precision='fp32' cannot be honoured by engine='tensorrt': "
                                                      "the folder's plans were built in fp16"),
                        (dict(trt, threads=2), "threads=2 cannot be honoured by engine='tensorrt'"),
                        (dict(segments={}, threads=1), "threads=1 cannot be honoured by engine='dlpack'"),
                        (dict(segments={}, precision="fp32"), "precision='fp32' cannot be honoured by engine='dlpack'"),
                        (dict(precision="fp16"), "precision must be 'fp32' or 'bf16' for OpenVINO, got 'fp16'")]:
        with pytest.raises(ValueError, match=message):
            adadiff_rt.Runtime(str(folder_copy), **kw)
    if not (adadiff_rt.has_cuda and torch.cuda.is_available()):  # the plans' own precision passes the check
        with pytest.raises(RuntimeError, match="no CUDA device|built without CUDA"):
            adadiff_rt.Runtime(str(folder_copy), precision="fp16", **trt)


def test_plan_building_and_cuda_graph_options_are_checked_first(folder_copy):
    """build_plans and cuda_graphs (issue 17) are checked before any device or engine is touched: a
    bad value, CUDA graphs asked of an engine without them, and a precision TensorRT cannot build the
    plans in are refused with ValueError; a folder without plans and build_plans='never' with a
    RuntimeError that says so (CI has neither GPU nor TensorRT, so these run before either is
    needed)."""
    trt = dict(device="cuda", engine="tensorrt")
    for kw, error, message in [
            (dict(build_plans="sometimes"), ValueError, "build_plans must be 'auto' or 'never', got 'sometimes'"),
            (dict(cuda_graphs=True), ValueError, "cuda_graphs=True cannot be honoured by engine='openvino'"),
            (dict(segments={}, cuda_graphs=True), ValueError, "cuda_graphs=True cannot be honoured by engine='dlpack'"),
            (dict(trt, precision="int8"), ValueError,
             "precision must be 'fp32', 'fp16' or 'bf16' for the TensorRT plans built here, got 'int8'"),
            (dict(trt, precision="fp16", build_plans="never"), RuntimeError,
             "no TensorRT plans .* and build_plans='never'"),
            (dict(trt, build_plans="never"), RuntimeError, "no TensorRT plans .* and build_plans='never'")]:
        with pytest.raises(error, match=message):
            adadiff_rt.Runtime(str(folder_copy), **kw)
    rt = adadiff_rt.Runtime(str(folder_copy), cuda_graphs=False, threads=1)
    assert (rt.engine, rt.cuda_graphs, rt.graphs_captured) == ("openvino", False, 0)


def test_huge_max_batch_fails_fast_naming_the_memory(folder_copy):
    """max_batch 10^7 used to make the runtime zero hundreds of GB until the OOM killer ended it:
    the runtime, and check_engines (verify), refuse it before allocating, naming what it needs
    and what is free. Run with allocations capped (a 16 GiB address-space limit; under
    AddressSanitizer, which reserves terabytes of address space, its 4 GiB soft RSS limit), so a
    regression fails this test with MemoryError instead of taking the machine's memory."""
    import subprocess
    import sys
    import textwrap

    _edit_manifest(folder_copy, lambda d: d.update(max_batch=10**7))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    asan = "asan" in env.get("LD_PRELOAD", "")
    if asan:
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":allocator_may_return_null=1:soft_rss_limit_mb=4096"
    script = textwrap.dedent(f"""
        import resource, sys
        if not {asan}:
            resource.setrlimit(resource.RLIMIT_AS, (16 << 30, 16 << 30))
        import adadiff_rt
        for load in (lambda: adadiff_rt.Runtime({str(folder_copy)!r}, cache_dir=""),
                     lambda: adadiff_rt.check_engines({str(folder_copy)!r})):
            try:
                load()
                print("LOADED")
            except RuntimeError as e:
                print(e)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout
    for line in lines:
        assert line.startswith(f"{folder_copy}/manifest.json: max_batch 10000000 needs "), line
        assert re.search(r"needs [\d.]+ GiB of host memory for adadiff_rt's buffers \(20000000 rows", line), line
        assert re.search(r"; (MemAvailable in /proc/meminfo|the cgroup's memory.max less memory.current) is "
                         r"[\d.]+ [KMGT]?i?B\. Rebuild the engines with a smaller max_batch", line), line


def test_construction_releases_the_gil(engines, tmp_path):  # noqa: F811
    """Other Python threads run while a Runtime hashes its files and compiles its engines (issue 17:
    the constructor held the GIL throughout)."""
    import time
    stamps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        # A fresh compile (empty cache folder) takes long enough to see the ticker inside it.
        start = time.perf_counter()
        adadiff_rt.Runtime(str(engines), threads=1, cache_dir=str(tmp_path / "cache"))
        end = time.perf_counter()
    finally:
        stop.set()
        ticker.join()
    # The share of 50 ms windows of the call in which the ticker ran: a held GIL lets it in only where
    # something inside happens to release it (measured: 4% with the GIL held, 94% released).
    window = 0.05
    n = int((end - start - 0.02) / window)
    assert n >= 4, f"construction took {end - start:.3f} s: too short to tell"
    edges = [start + 0.02 + k * window for k in range(n + 1)]
    covered = sum(any(edges[k] <= s < edges[k + 1] for s in stamps) for k in range(n))
    assert covered >= n / 2, f"other threads ran in {covered} of {n} 50 ms windows of a {end - start:.2f} s construction"
