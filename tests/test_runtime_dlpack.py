"""adadiff_rt's DLPack engine (Python callables over the runtime's buffers) against the oracle.

On CPU it runs everywhere (torch CPU segment modules as the callables). On CUDA the same tests run
the CUDA path (device buffers, exit-decision/compaction/sampler kernels, the runtime's stream)
with torch modules on the GPU; they skip with a reason where there is no GPU (scripts/gpu_check.sh
runs them on a GPU machine). TensorRT: skipped with a reason unless the module was built with it
and a GPU is present; no fake stands in for it.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.sampling.early_exit import EarlyExitDenoiser, ExitPolicy
from adadiff_export.sampling.samplers import guided, sample as py_sample
from conftest import tiny_model
from runtime_engines import import_runtime, inputs, manifest_only, rel_err, split_threshold, torch_segments
from runtime_engines import oracle as cpu_oracle

adadiff_rt = import_runtime()

MAX_BATCH = 16
TOL = 1e-4
CUDA_OK = adadiff_rt.has_cuda and torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA GPU and an adadiff_rt built with CUDA (scripts/gpu_check.sh)"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return manifest_only(tiny_model(uem_gain=20.0), tmp_path_factory.mktemp("dl") / "engines", MAX_BATCH)


def setup(folder, device):
    """The runtime over torch segments on `device`, and the oracle: the same weights on the CPU
    (the reference early exit keeps its bookkeeping on the CPU)."""
    torch.backends.cudnn.allow_tf32 = False  # fp32 parity: no TF32 convolutions on the GPU
    torch.backends.cuda.matmul.allow_tf32 = False
    engine_model = tiny_model(uem_gain=20.0).to(device)
    rt = adadiff_rt.Runtime(str(folder), device=device, segments=torch_segments(engine_model, device))
    return tiny_model(uem_gain=20.0), rt


def oracle(model, x, t, y, device=None, **kw):
    """The oracle on the CPU whatever the engine's device."""
    return cpu_oracle(model, x, t, y, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
@pytest.mark.parametrize("granularity", ["sample", "batch"])
def test_dlpack_engine_matches_oracle(folder, device, batch, granularity):
    model, rt = setup(folder, device)
    assert rt.engine == "dlpack" and rt.device == device
    x, t, y = inputs(model, batch, seed=batch)
    _, _, u_all = oracle(model, x, t, y, device, threshold=0.0)
    thr = split_threshold(u_all, lambda th: oracle(model, x, t, y, device, threshold=th, granularity=granularity)[1])
    cases = [dict(threshold=thr), dict(policy="static", static_layer=2), dict(threshold=thr, patience=2)]
    if granularity == "batch":  # the authors' rule decides for the batch
        cases += [dict(policy="uem-authors", threshold=thr)]
    if granularity == "sample":  # the time tables decide per sample (a batch of rows in several bins)
        cases += [dict(policy="schedule", table={"t_bounds": [0.6, 0.3], "layers": [1, 3, 4]}),
                  dict(policy="uem-time", table={"t_bounds": [0.5], "min_layers": [1, 2], "max_layers": [3, 5],
                                                 "thresholds": [thr, thr]})]
    for kw in cases:
        eps, layer, u = rt.denoise(x, t, y, granularity=granularity, **kw)
        ref_eps, ref_layer, ref_u = oracle(model, x, t, y, device, granularity=granularity, **kw)
        np.testing.assert_array_equal(layer, ref_layer)
        assert rel_err(eps, ref_eps) <= TOL
        np.testing.assert_array_equal(np.isnan(u), np.isnan(ref_u))
    if batch == MAX_BATCH and granularity == "sample":
        eps, layer, _ = rt.denoise(x, t, y, threshold=thr)
        assert len(np.unique(layer)) >= 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler,guidance,policy", [("dpm++", 2.0, "uem"), ("ddim", 1.0, "uem"),
                                                     ("dpm++", 2.0, "uem-authors")])
def test_dlpack_sample_matches_python_sampler(folder, device, sampler, guidance, policy):
    model, rt = setup(folder, device)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    y = torch.tensor([0, 2, 7, 10])
    gran = "batch" if policy == "uem-authors" else "sample"  # the authors' rule: each guidance half decides apart
    images, used = rt.sample(noise.numpy(), y.numpy(), sampler=sampler, steps=5, guidance=guidance, threshold=0.5,
                             policy=policy)
    den = EarlyExitDenoiser(model, ExitPolicy(policy, threshold=0.5, granularity=gran))
    ref = py_sample(sampler, guided(den, guidance, model.config.num_classes), noise, VPSchedule(), 5, y=y)
    np.testing.assert_array_equal(used, den.layers_by_step().numpy())
    assert rel_err(images, ref.numpy()) <= TOL


def test_callable_errors_name_the_segment(folder):
    model = tiny_model(uem_gain=20.0)
    segs = torch_segments(model)
    x, t, y = inputs(model, 3)

    def boom(*_):
        raise ValueError("kaput")

    for name, fn, msg in [("layer_2", boom, "segment layer_2: the callable raised .*kaput"),
                          ("head", lambda h: torch.zeros(1, 1, 8, 8), r"segment head output eps: shape \[1, 1, 8, 8\]"),
                          ("stem", lambda *a: torch.zeros(3), "segment stem: the callable returned 1 outputs"),
                          ("layer_1", lambda h, temb: (torch.zeros(3, 18, 32, dtype=torch.float64), torch.zeros(3)),
                           "segment layer_1 output h_out: dtype mismatch"),
                          ("layer_4", lambda *a: ([1.0], torch.zeros(3)), "without __dlpack__")]:
        rt = adadiff_rt.Runtime(str(folder), segments={**segs, name: fn})
        with pytest.raises(RuntimeError, match=msg):
            rt.denoise(x, t, y, threshold=0.0)
    with pytest.raises(ValueError, match="no callable for segment 'head'"):
        adadiff_rt.Runtime(str(folder), segments={k: v for k, v in segs.items() if k != "head"})
    with pytest.raises(ValueError, match="no segment named 'layer_9'"):
        adadiff_rt.Runtime(str(folder), segments={**segs, "layer_9": boom})


def test_buffer_views_are_zero_copy_dlpack(folder):
    model = tiny_model(uem_gain=20.0)
    segs = torch_segments(model)
    seen = {}

    def stem(*views):
        seen["shapes"] = [v.shape for v in views]
        seen["dtypes"] = [v.dtype for v in views]
        seen["device"] = views[0].__dlpack_device__()
        return segs["stem"](*views)

    rt = adadiff_rt.Runtime(str(folder), segments={**segs, "stem": stem})
    x, t, y = inputs(model, 3)
    rt.denoise(x, t, y)
    assert seen["shapes"] == [(3, 1, 8, 8), (3,), (3,)]
    assert seen["dtypes"] == ["float32", "float32", "int64"]
    assert seen["device"] == (1, 0)


@pytest.mark.skipif(not adadiff_rt.has_tensorrt, reason="adadiff_rt was built without TensorRT (not installable here)")
@pytest.mark.skipif(not CUDA_OK, reason="TensorRT needs a CUDA GPU")
def test_tensorrt_engine_matches_oracle(tmp_path):
    """Only where TensorRT and a GPU exist: real plans from build_engines(tensorrt="on")."""
    from adadiff_export.export.build import build_engines
    from runtime_engines import save_checkpoint

    model = tiny_model(uem_gain=20.0)
    folder = build_engines(save_checkpoint(model, tmp_path / "m.pt"), tmp_path / "engines", max_batch=MAX_BATCH,
                           tensorrt="on", log=lambda _m: None)
    rt = adadiff_rt.Runtime(str(folder), device="cuda", engine="tensorrt")
    x, t, y = inputs(model, 7)
    for kw in (dict(threshold=0.0), dict(policy="static", static_layer=3)):
        eps, layer, _ = rt.denoise(x, t, y, **kw)
        ref_eps, ref_layer, _ = oracle(model, x, t, y, **kw)
        np.testing.assert_array_equal(layer, ref_layer)
        assert rel_err(eps, ref_eps) <= 1e-2  # TensorRT may use TF32 / fp16 kernels


# ---- arrays of any kind in, the same kind out (issue 17) ------------------------------------------

class DlpackOnly:
    """A foreign array that only speaks DLPack (no numpy, no torch type): results come back as numpy."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, stream=None, **kw):
        return self.a.__dlpack__()

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_and_dlpack_inputs_give_numpys_results(folder, device):
    model, rt = setup(folder, device)
    x, t, y = inputs(model, 5, seed=3)
    thr = 0.5
    want = rt.denoise(x, t, y, threshold=thr)
    on = "cuda" if device == "cuda" else "cpu"
    tx, tt, ty = (torch.from_numpy(a).to(on) for a in (x, t, y))
    got = rt.denoise(tx, tt, ty, threshold=thr)
    # torch in, torch out, on the input's device, the very same numbers.
    for g, w in zip(got, want):
        assert isinstance(g, torch.Tensor) and g.device.type == on
        np.testing.assert_array_equal(g.cpu().numpy(), w)
    full = rt.full(tx, tt, ty)
    assert isinstance(full, torch.Tensor) and full.device.type == on
    np.testing.assert_array_equal(full.cpu().numpy(), rt.full(x, t, y))
    noise = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    labels = np.array([1, 4, 10])
    images, used = rt.sample(noise, labels, steps=4, guidance=2.0, threshold=thr)
    t_images, t_used = rt.sample(torch.from_numpy(noise).to(on), torch.from_numpy(labels).to(on), steps=4,
                                 guidance=2.0, threshold=thr)
    assert t_images.device.type == on
    np.testing.assert_array_equal(t_images.cpu().numpy(), images)
    np.testing.assert_array_equal(np.asarray(t_used), used)
    if device == "cpu":  # a bare DLPack object: numpy's results
        d = rt.denoise(DlpackOnly(x), DlpackOnly(t), DlpackOnly(y), threshold=thr)
        assert all(type(a) is np.ndarray for a in d)
        for g, w in zip(d, want):
            np.testing.assert_array_equal(g, w)
        # torch.from_dlpack takes the results back without a copy.
        assert torch.from_dlpack(d[0]).data_ptr() == d[0].__array_interface__["data"][0]


def test_array_arguments_are_checked(folder):
    model, rt = setup(folder, "cpu")
    x, t, y = inputs(model, 2)
    with pytest.raises(TypeError, match="x must have dtype float32, got float64"):
        rt.denoise(torch.from_numpy(x).double(), t, y)
    with pytest.raises(TypeError, match="y must be a numpy array of int64, a DLPack tensor"):
        rt.denoise(x, t, [1, 2])
    with pytest.raises(ValueError, match="stream= is for a Runtime on device='cuda'"):
        rt.denoise(x, t, y, stream=0)
    with pytest.raises(TypeError, match="stream must be None, a CUDA stream handle"):
        rt.full(x, t, y, stream="s")
    # A non-contiguous torch view goes through numpy (a C-contiguous copy) and gives the same answer.
    wide = torch.from_numpy(np.concatenate([x, x], axis=3))[..., ::2]
    np.testing.assert_array_equal(rt.full(wide, t, y).numpy(), rt.full(np.ascontiguousarray(wide.numpy()), t, y))


@pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA GPU and an adadiff_rt built with CUDA (scripts/gpu_check.sh)")
def test_cuda_tensors_stream_and_device_restore(folder):
    model, rt = setup(folder, "cuda")
    x, t, y = inputs(model, 4, seed=2)
    want = rt.denoise(x, t, y, threshold=0.5)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        tx, tt, ty = (torch.from_numpy(a).cuda() for a in (x, t, y))
        got = rt.denoise(tx, tt, ty, threshold=0.5, stream=s)
        eps = got[0] * 1  # queued on s after the runtime's work
    s.synchronize()
    np.testing.assert_array_equal(eps.cpu().numpy(), want[0])
    # Constructing and calling never leaves the caller's thread on another device.
    before = torch.cuda.current_device()
    rt.denoise(tx, tt, ty)
    assert torch.cuda.current_device() == before
