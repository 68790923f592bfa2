"""Engines folders and oracle helpers for the adadiff_rt tests (tests/test_runtime*.py).

`onnx_engines` builds a real engines folder with `adadiff_export.export.build.build_engines` once and
keeps it in pytest's cache (keyed on the weights and the exporter's source), because the ONNX
export takes a minute or two on a small CPU. `manifest_only` writes just manifest.json, which is
all the DLPack engine needs (it runs the user's callables, not the ONNX files).
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
import pytest
import torch

from adadiff_export.export.manifest import Manifest, Segment, write
from adadiff_export.export.segments import segment_module, segment_specs
from adadiff_export.model import checkpoint as ckpt
from adadiff_export.model.schedule import VPSchedule
from adadiff_export.model.uvit import UViT
from adadiff_export.sampling.early_exit import ExitPolicy, early_exit
from adadiff_export.sampling.exit_settings import ExitDefaults, TimeTable

EXPORTER_SOURCES = ("model/uvit.py", "export/segments.py", "export/onnx_export.py", "export/manifest.py")  # what shapes the files
THRESHOLD = 0.5
TOL = 1e-4  # fp32 parity: max |got - ref| / max |ref|


def import_runtime(need_openvino: bool = False):
    """adadiff_rt, or skip the calling test (or module, called at its top; never under ADADIFF_RT_REQUIRED=1, as in CI)."""
    if os.environ.get("ADADIFF_RT_REQUIRED") == "1":
        import adadiff_rt
    else:
        adadiff_rt = pytest.importorskip("adadiff_rt", reason="adadiff_rt is not built (pip install .)")
    if need_openvino and not adadiff_rt.has_openvino:
        pytest.skip("adadiff_rt was built without OpenVINO", allow_module_level=True)
    return adadiff_rt
GUIDANCE = 2.0


def _key(model: UViT, max_batch: int) -> str:
    h = hashlib.sha256(f"max_batch={max_batch}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    src = Path(__file__).resolve().parents[1] / "adadiff_export"
    for f in EXPORTER_SOURCES:
        h.update((src / f).read_bytes())
    return h.hexdigest()[:24]


def save_checkpoint(model: UViT, path: Path) -> Path:
    ckpt.save({"config": model.config.to_dict(), "schedule": VPSchedule().to_dict(), "ema": model.state_dict(),
               "defaults": {"guidance": GUIDANCE, "threshold": THRESHOLD}}, path)
    return path


def onnx_engines(cache_root: Path, model: UViT, max_batch: int) -> Path:
    """A built engines folder for `model` (cached under `cache_root`)."""
    from adadiff_export.export.build import build_engines

    out = Path(cache_root) / f"engines-{_key(model, max_batch)}"
    if (out / "manifest.json").is_file():
        return out
    for old in Path(cache_root).glob("engines-*"):
        shutil.rmtree(old, ignore_errors=True)
    work = Path(cache_root) / "work"
    work.mkdir(parents=True, exist_ok=True)
    path = save_checkpoint(model, work / "model.pt")
    build_engines(path, out, max_batch=max_batch, tensorrt="off", force=True, log=lambda _m: None)
    return out


def manifest_only(model: UViT, folder: Path, max_batch: int) -> Path:
    """An engines folder holding only manifest.json (segment files named but absent)."""
    c = model.config
    segments = [Segment(**{**spec.__dict__, "file": f"{spec.name}.onnx", "sha256": "0" * 64})
                for spec in segment_specs(model)]
    m = Manifest(model={**c.to_dict(), "null_class": c.num_classes if c.num_classes > 0 else None,
                        "num_tokens": c.num_tokens, "num_extra_tokens": c.num_extra_tokens},
                 schedule=VPSchedule().to_dict(), max_batch=max_batch, segments=segments,
                 exit=ExitDefaults(threshold=THRESHOLD, guidance=GUIDANCE))
    folder.mkdir(parents=True, exist_ok=True)
    write(m, folder)
    return folder


def torch_segments(model: UViT, device: str = "cpu") -> Dict[str, Callable]:
    """segment name -> callable over DLPack views, computing with `model`'s torch segments on `device`."""
    model = model.to(device)
    out: Dict[str, Callable] = {}
    for spec in segment_specs(model):
        module = segment_module(model, spec)

        def call(*views, _m=module):
            with torch.no_grad():
                r = _m(*[torch.from_dlpack(v) for v in views])
            return tuple(t.contiguous() for t in r) if isinstance(r, tuple) else r.contiguous()

        out[spec.name] = call
    return out


def inputs(model: UViT, batch: int, seed: int = 0, conditional: bool = True):
    """Noisy images at random times and labels (null class included), as numpy arrays."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.rand(batch, generator=g) * 0.98 + 0.01
    y = torch.randint(0, c.num_classes + 1, (batch,), generator=g) if conditional else None
    return x.numpy(), t.numpy(), None if y is None else y.numpy()


def split_threshold(u: np.ndarray, exit_layers_of: Callable[[float], np.ndarray]) -> float:
    """A threshold (a midpoint between observed u values, never an observed value) under which the
    oracle sends the samples of a batch to the most distinct exit layers."""
    vals = np.unique(u[np.isfinite(u)])
    mids = (vals[:-1] + vals[1:]) / 2
    best, best_n = float(mids[len(mids) // 2]), 0
    for thr in mids[:: max(1, len(mids) // 40)]:
        n = len(np.unique(exit_layers_of(float(thr))))
        if n > best_n:
            best, best_n = float(thr), n
    return best


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (the 1e-4 'relative' parity measure)."""
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12))


def maybe(x: Optional[np.ndarray]) -> Optional[torch.Tensor]:
    return None if x is None else torch.from_numpy(x)


# ----- the oracle and parity checks shared by the runtime tests -----

def oracle(model, x, t, y, **kw):
    table = kw.get("table")
    policy = ExitPolicy(kind=kw.get("policy", "uem"), threshold=kw.get("threshold", 0.1),
                        patience=kw.get("patience", 1), layer=kw.get("static_layer", 0),
                        granularity=kw.get("granularity", "sample"),
                        table=TimeTable.from_dict(table) if table is not None else None)
    r = early_exit(model, torch.from_numpy(x), torch.from_numpy(t), maybe(y), policy)
    return r.eps.numpy(), r.exit_layer.numpy(), r.u.numpy()


def assert_parity(rt, model, x, t, y, **kw):
    eps, layer, u = rt.denoise(x, t, y, **kw)
    ref_eps, ref_layer, ref_u = oracle(model, x, t, y, **kw)
    np.testing.assert_array_equal(layer, ref_layer)
    assert eps.dtype == np.float32 and layer.dtype == np.int64 and u.dtype == np.float32
    assert rel_err(eps, ref_eps) <= TOL
    np.testing.assert_array_equal(np.isnan(u), np.isnan(ref_u))
    np.testing.assert_allclose(u[~np.isnan(u)], ref_u[~np.isnan(ref_u)], rtol=TOL, atol=1e-6)
    return layer


def mixed_threshold(model, x, t, y, granularity="sample", patience=1):
    _, _, u_all = oracle(model, x, t, y, threshold=0.0)
    return split_threshold(u_all, lambda thr: oracle(model, x, t, y, threshold=thr, granularity=granularity,
                                                     patience=patience)[1])


# ----- fixtures shared by the OpenVINO runtime tests (import them into a test module by name) -----

MAX_BATCH = 16


@pytest.fixture(scope="module")
def model():
    """A tiny model whose uncertainties spread across samples (exits differ per row)."""
    from conftest import tiny_model

    return tiny_model(uem_gain=20.0)


@pytest.fixture(scope="module")
def engines(request, model) -> Path:
    """A real build of `model` (cached in pytest's cache across runs)."""
    return onnx_engines(request.config.cache.mkdir("adadiff_rt_engines"), model, MAX_BATCH)


@pytest.fixture(scope="module")
def rt(engines):
    return import_runtime(need_openvino=True).Runtime(str(engines), threads=1)


@pytest.fixture(scope="module")
def rt_chained(engines):
    """Every policy through the chain of segments: no fused static graph, no exit graph."""
    return import_runtime(need_openvino=True).Runtime(str(engines), threads=1, fuse_static=False, fuse_exit=False)
