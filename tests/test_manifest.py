"""manifest.json: round trip and every refusal (docs/MANIFEST.md), without exporting anything."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from adadiff_export.export import manifest as mf
from adadiff_export.export.segments import segment_specs
from adadiff_export.model.config import preset
from adadiff_export.model.uvit import UViT
from adadiff_export.sampling.exit_settings import ExitDefaults, TimeTable
from runtime_engines import import_runtime


def _folder(tmp_path: Path, depth_preset: str = "tiny") -> Path:
    """A folder with dummy segment files and a valid manifest naming them."""
    model = UViT(preset(depth_preset))
    segments = []
    for spec in segment_specs(model):
        name = f"{spec.name}.onnx"
        (tmp_path / name).write_bytes(f"dummy {spec.name}".encode())
        segments.append(replace(spec, file=name, sha256=mf.sha256_file(tmp_path / name)))
    c = model.config
    m = mf.Manifest(model={**c.to_dict(), "null_class": c.num_classes, "num_tokens": c.num_tokens,
                           "num_extra_tokens": c.num_extra_tokens},
                    schedule={"type": "vp_linear", "beta_min": 0.1, "beta_max": 20.0, "t_eps": 0.001},
                    max_batch=8, segments=segments, source={"checkpoint": "x.pt", "sha256": "0" * 64},
                    exit=ExitDefaults(policy="schedule", threshold=0.25, guidance=1.5,
                                      schedule=TimeTable.schedule([0.5], [2, 4]),
                                      uem_time=TimeTable((0.5,), (1, 2), (3, 5), (0.2, 0.3))),
                    calibration=[mf.CalibrationPoint("schedule", 3.0, 3.0, 1e-3),
                                 mf.CalibrationPoint("uem", 3.0, 3.1, 2e-3, threshold=0.2)])
    mf.write(m, tmp_path)
    return tmp_path


def _sub(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def _edit(folder: Path, fn) -> None:
    path = folder / mf.FILENAME
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_round_trip(tmp_path):
    folder = _folder(tmp_path)
    m = mf.load(folder)
    assert [s.name for s in m.segments] == ["stem", "layer_1", "layer_2", "layer_3", "layer_4", "layer_5", "head", "full"]
    assert m.version == mf.VERSION == 2
    assert m.exit.threshold == 0.25 and m.exit.guidance == 1.5 and m.exit.policy == "schedule"
    assert m.exit.schedule == TimeTable.schedule([0.5], [2, 4])
    assert m.exit.uem_time.thresholds == (0.2, 0.3) and m.exit.uem_time.max_layers == (3, 5)
    assert m.calibration[1] == mf.CalibrationPoint("uem", 3.0, 3.1, 2e-3, threshold=0.2)
    assert m.segment("stem").inputs[0] == mf.TensorSpec("x", "float32", ("B", 1, 8, 8))
    again = tmp_path / "again"
    again.mkdir()
    mf.write(m, again)
    assert json.loads((again / mf.FILENAME).read_text()) == json.loads((folder / mf.FILENAME).read_text())


def test_skip_wiring_in_mid_out_for_depth_13():
    specs = {s.name: s for s in segment_specs(UViT(preset("small")))}
    assert [specs[f"layer_{i}"].block for i in range(1, 14)] == ["in"] * 6 + ["mid"] + ["out"] * 6
    # out layer k+1+j takes in layer k+1-j (k = 6)
    assert [specs[f"layer_{i}"].skip_from for i in range(8, 14)] == [6, 5, 4, 3, 2, 1]
    assert all(specs[f"layer_{i}"].skip_from is None for i in range(1, 8))
    assert [t.name for t in specs["layer_8"].inputs] == ["h_in", "temb", "skip"]
    assert [t.name for t in specs["layer_7"].inputs] == ["h_in", "temb"]


@pytest.mark.parametrize("name", ["../stem.onnx", "/etc/passwd", "sub/stem.onnx", "..", "", "C:\\x.onnx", "a\\b.onnx"])
def test_refuses_file_names_outside_the_folder(tmp_path, name):
    folder = _folder(tmp_path)
    _edit(folder, lambda d: d["segments"][2].update(file=name))
    with pytest.raises(mf.ManifestError, match="layer_2"):
        mf.load(folder)


def test_refuses_plan_outside_the_folder(tmp_path):
    folder = _folder(tmp_path)
    trt = {"version": "10.5", "gpu_arch": "sm_90", "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 8},
           "plans": {"stem": {"file": "../stem.plan", "sha256": "0" * 64}}}
    _edit(folder, lambda d: d.update(tensorrt=trt))
    with pytest.raises(mf.ManifestError, match="outside"):
        mf.load(folder)


def test_refuses_other_versions_and_formats(tmp_path):
    folder = _folder(tmp_path)
    _edit(folder, lambda d: d.update(version=3))
    with pytest.raises(mf.ManifestError, match="version 3"):
        mf.load(folder)
    _edit(folder, lambda d: d.update(version=2, format="something-else"))
    with pytest.raises(mf.ManifestError, match="format"):
        mf.load(folder)


def test_bad_checksum_names_the_file(tmp_path):
    folder = _folder(tmp_path)
    (folder / "layer_4.onnx").write_bytes(b"dummy layer_5")  # same length, other bytes
    with pytest.raises(mf.ManifestError, match="layer_4.onnx"):
        mf.load(folder)
    mf.load(folder, check=False)  # the schema alone still holds


def test_missing_file_and_bad_json(tmp_path):
    folder = _folder(tmp_path)
    (folder / "head.onnx").unlink()
    with pytest.raises(mf.ManifestError, match="head.onnx is missing"):
        mf.load(folder)
    (folder / mf.FILENAME).write_text('{"format": "adadiff-engines", ')
    with pytest.raises(mf.ManifestError, match="not valid JSON"):
        mf.load(folder)
    with pytest.raises(FileNotFoundError):
        mf.load(tmp_path / "nope")


def test_refuses_wrong_wiring_order_and_tensor_names(tmp_path):
    folder = _folder(tmp_path)
    _edit(folder, lambda d: d["segments"][5].update(skip_from=2))  # layer_5 takes layer_1
    with pytest.raises(mf.ManifestError, match="layer_5.*skip_from"):
        mf.load(folder)
    folder2 = _folder(_sub(tmp_path, "b"))
    _edit(folder2, lambda d: d["segments"].reverse())
    with pytest.raises(mf.ManifestError, match="segments are"):
        mf.load(folder2)
    folder3 = _folder(_sub(tmp_path, "c"))
    _edit(folder3, lambda d: d["segments"][1]["outputs"][1].update(name="uncertainty"))
    with pytest.raises(mf.ManifestError, match="layer_1: tensors"):
        mf.load(folder3)
    folder4 = _folder(_sub(tmp_path, "d"))
    _edit(folder4, lambda d: d["segments"][0]["inputs"][0].update(shape=["B", 1, "H", 8]))
    with pytest.raises(mf.ManifestError, match="stem: tensor x has shape"):
        mf.load(folder4)


def test_version_1_manifest_loads_with_its_old_calibration(tmp_path):
    """A folder from before the time tables: version 1, no exit.layer/schedule/uem_time, a threshold sweep."""
    folder = _folder(tmp_path)

    def to_v1(d):
        d["version"] = 1
        d["exit"] = {"policy": "uem", "threshold": 0.3, "patience": 1, "granularity": "sample", "guidance": 2.0}
        d["calibration"] = [{"threshold": 0.1, "mean_layers": 4.5, "mse": 0.001, "fd": None}]
    _edit(folder, to_v1)
    m = mf.load(folder)
    assert m.version == 1 and m.exit == ExitDefaults(threshold=0.3)
    assert m.calibration == [mf.CalibrationPoint(threshold=0.1, mean_layers=4.5, mse=0.001)]


@pytest.mark.parametrize("version,message", [(3, "update adadiff"), (0, "rebuild the engines")])
def test_other_versions_are_refused_with_what_to_do(tmp_path, version, message):
    folder = _folder(tmp_path)
    _edit(folder, lambda d: d.update(version=version))
    with pytest.raises(mf.ManifestError, match=message):
        mf.load(folder)


@pytest.mark.parametrize("exit_edit,message", [
    ({"policy": "uem-time", "uem_time": None}, "uem_time is absent"),
    ({"schedule": {"t_bounds": [0.5, 0.7], "layers": [1, 2, 3]}}, "strictly decrease"),
    ({"layer": 9}, "exit.layer must be in 0..5"),
    ({"uem_time": {"t_bounds": [], "layers": [2]}}, "is not a uem-time table"),
    ({"bogus": 1}, "unknown keys"),
])
def test_bad_exit_sections_are_refused(tmp_path, exit_edit, message):
    folder = _folder(tmp_path)
    _edit(folder, lambda d: d["exit"].update(exit_edit))
    with pytest.raises(mf.ManifestError, match=message):
        mf.load(folder)
# ----- the runtime's reader (adadiff_rt.check_engines) on the same folders --------------------------

def test_runtime_streams_large_files_through_its_hash(tmp_path):
    """A TensorRT plan larger than the runtime's 4 MiB read buffer (plans run to gigabytes): hashed whole,
    so a change in its last byte is named with both digests."""
    import hashlib

    adadiff_rt = import_runtime()
    folder = _folder(tmp_path)
    plan = folder / "stem.plan"
    data = bytearray(range(256)) * (9 * 4096) + b"end"  # 9 MiB and 3 bytes: two full reads and a short one
    plan.write_bytes(bytes(data))
    digest = hashlib.sha256(data).hexdigest()
    trt = {"version": "10.9", "gpu_arch": "sm_90", "precision": "fp16", "profile": {"min": 1, "opt": 4, "max": 8},
           "plans": {"stem": {"file": "stem.plan", "sha256": digest}}}
    _edit(folder, lambda d: d.update(tensorrt=trt))
    found = adadiff_rt.check_engines(str(folder))
    assert found["files"] == 9 and found["max_batch"] == 8
    data[-1] ^= 0xFF
    plan.write_bytes(bytes(data))
    changed = hashlib.sha256(data).hexdigest()
    with pytest.raises(RuntimeError, match=f"TensorRT plan of segment stem: file stem.plan does not match its sha256 "
                                           f"in manifest.json \\(expected {digest}, found {changed}\\)"):
        adadiff_rt.check_engines(str(folder))


def test_runtime_sizes_its_buffers_alike_for_a_folder_and_for_build(tmp_path):
    """check_engines (a folder) and check_memory (build --max-batch, before a folder exists) give the
    same bytes, which grow in proportion to the rows."""
    adadiff_rt = import_runtime()
    folder = _folder(tmp_path)
    model = json.loads((folder / mf.FILENAME).read_text())["model"]
    at_8 = adadiff_rt.check_memory(model, 8)
    from_folder = adadiff_rt.check_engines(str(folder))["memory"]
    assert (from_folder["capacity"], from_folder["needed"]) == (at_8["capacity"], at_8["needed"])
    at_16, at_24 = adadiff_rt.check_memory(model, 16), adadiff_rt.check_memory(model, 24)
    assert at_8["capacity"] == 16 and at_16["needed"] - at_8["needed"] == at_24["needed"] - at_16["needed"] > 0
    with pytest.raises(ValueError, match="max_batch must be in 1..1000000000"):
        adadiff_rt.check_memory(model, 0)
