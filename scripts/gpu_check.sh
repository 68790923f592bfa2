#!/usr/bin/env bash
# GPU check of adadiff_rt's CUDA path, for a bare GPU machine (torch with CUDA, nvcc, cmake,
# pybind11, OpenSSL's headers (libssl-dev); no OpenVINO, no TensorRT, no network: nlohmann/json comes
# from third_party/ where the system has none). From the repository root:
#
#     bash scripts/gpu_check.sh            # writes gpu_check.log (and into $OUT when set)
#
# 1. builds the module with CUDA (OpenVINO off; TensorRT where its SDK is found: TENSORRT_ROOT)
#    into build/gpu, for the default architecture list (ADADIFF_CUDA_ARCHITECTURES overrides it),
# 2. runs the CUDA tests: the kernels embedded for the listed architectures, torch segment modules
#    on the GPU as the engines (device buffers, exit/compaction/sampler kernels, stream) against the
#    PyTorch oracle, torch CUDA tensors in and out, stream=, the device restored (the TensorRT plan
#    checks themselves run in CI: tests/test_tensorrt_checks.py),
# 3. prints the issue-17 table (scripts/gpu_check.py: one row per item, PASS / FAIL / SKIP and why:
#    TensorRT parity and guided sampling at 2 x max_batch, a version mismatch refused with
#    build_plans='never' and rebuilt with 'auto', plans built from ONNX into the cache and read back,
#    register-plans on trtexec plans and on a fake, CUDA graphs on and off giving the same images
#    (with their timings), device restore on a second GPU),
# 4. prints a short timing table: card, parity, and denoise timings on the GPU ("rt ms" is the
#    DLPack engine, i.e. torch segments called from C++; "torch full ms" the plain full-depth forward).
set -euo pipefail
cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-.}"
LOG="$LOG_DIR/gpu_check.log"
exec > >(tee "$LOG") 2>&1

PY="${PYTHON:-python}"
NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: none"
"$NVCC" --version | tail -1
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"

echo "== build (CUDA on, OpenVINO off)"
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
# The default architecture list (CMakeLists.txt), so the check runs what users get.
cmake -S . -B build/gpu "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DADADIFF_CUDA=ON -DADADIFF_OPENVINO=OFF \
  -DCMAKE_CUDA_COMPILER="$NVCC" \
  -DPython_EXECUTABLE="$(command -v "$PY")" -Dpybind11_DIR="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/build/gpu/lib"
cmake --build build/gpu --parallel "$(nproc)"
export PYTHONPATH="$PWD/build/gpu/lib:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ADADIFF_RT_REQUIRED=1
"$PY" -c "import adadiff_rt as r; print('adadiff_rt cuda', r.has_cuda, r.cuda_architectures, 'openvino', r.has_openvino, 'tensorrt', r.has_tensorrt)"

echo "== tests (CUDA path vs the PyTorch oracle, device tensors, plan checks)"
set +e
"$PY" -m pytest -q -rs tests/test_runtime_dlpack.py tests/test_cuda_build.py
TESTS=$?
echo "== issue 17 table"
"$PY" scripts/gpu_check.py
CHECKS=$?
[ "$TESTS" -eq 0 ] && TESTS=$CHECKS
set -e

echo "== table"
"$PY" - <<'PYEOF'
import time
import numpy as np
import torch
import adadiff_rt
from pathlib import Path
import sys, tempfile
sys.path.insert(0, "tests")
from conftest import tiny_model
from runtime_engines import inputs, manifest_only, torch_segments, rel_err
from adadiff_export.model.config import preset
from adadiff_export.sampling.early_exit import ExitPolicy, early_exit
from adadiff_export.model.uvit import UViT

def timed(fn, n=20):
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3

name = torch.cuda.get_device_name(0)
rows = []
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
for cfg in ("tiny", "small"):
    def make():
        torch.manual_seed(0)
        return tiny_model(uem_gain=20.0) if cfg == "tiny" else UViT(preset("small")).eval()
    ref_model, model = make(), make().cuda()  # the oracle keeps its bookkeeping on the CPU
    folder = manifest_only(model, Path(tempfile.mkdtemp()) / cfg, 64)
    rt = adadiff_rt.Runtime(str(folder), device="cuda", segments=torch_segments(model, "cuda"))
    for b in (1, 64):
        x, t, y = inputs(model, b, seed=b)
        xt, tt, yt = (torch.from_numpy(a).cuda() for a in (x, t, y))
        for thr in (0.0, 0.5):
            eps, layer, _ = rt.denoise(x, t, y, threshold=thr)
            ref = early_exit(ref_model, *(torch.from_numpy(a) for a in (x, t, y)), ExitPolicy(threshold=thr))
            same = bool((layer == ref.exit_layer.numpy()).all())
            err = rel_err(eps, ref.eps.numpy())
            ms_rt = timed(lambda: rt.denoise(x, t, y, threshold=thr))
            with torch.no_grad():
                ms_full = timed(lambda: model(xt, tt, yt))
            rows.append((cfg, b, thr, float(layer.mean()), same, err, ms_rt, ms_full))
print(f"GPU: {name}")
print(f"{'config':>6} | {'batch':>5} | {'thr':>4} | {'mean layer':>10} | {'exits equal':>11} | {'rel err':>8} | {'rt ms':>7} | {'torch full ms':>13}")
for r in rows:
    print(f"{r[0]:>6} | {r[1]:>5} | {r[2]:>4} | {r[3]:>10.2f} | {str(r[4]):>11} | {r[5]:>8.1e} | {r[6]:>7.2f} | {r[7]:>13.2f}")
PYEOF
echo "== tests exit status: $TESTS"
exit $TESTS
