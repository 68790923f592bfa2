#!/usr/bin/env bash
# Set up, then pass the tests: the whole suite against the installed adadiff_rt (its tests may not
# skip: ADADIFF_RT_REQUIRED=1), the C++ example against the installed C++ library, then the
# runtime tests again on an ASan+UBSan build of the C++ core.
# ADADIFF_SKIP_SANITIZE=1 leaves out the sanitizer stage.
set -euo pipefail
cd "$(dirname "$0")/.."
# CI has no locale: tqdm and the CLIs print UTF-8.
export LANG=C.UTF-8 PYTHONIOENCODING=utf-8
# Each stage's wall time, printed at the end: CI must stay under 20 minutes, and this says where they go.
STAGES=()
stage_done() { STAGES+=("$1 $((SECONDS - STAGE_START)) s"); STAGE_START=$SECONDS; }
trap 'echo "stages: ${STAGES[*]:-none finished}"' EXIT
STAGE_START=$SECONDS
bash scripts/setup.sh
stage_done setup

# Run from a folder outside the checkout's build dirs so `import adadiff_rt` finds the installed module.
ADADIFF_RT_REQUIRED=1 python -m pytest -q -rs --durations=5 tests
stage_done tests

# The C++ user's path (about a minute): the library installed alone, examples/cpp built against it
# with find_package(adadiff_rt) and run on the tiny engines folder the runtime tests built (found in
# pytest's cache, or built again if that is gone).
ENGINES=$(python -c "import sys; sys.path.insert(0, 'tests')
from pathlib import Path
from conftest import tiny_model
from runtime_engines import onnx_engines
from test_runtime import MAX_BATCH
print(onnx_engines(Path('.pytest_cache/d/adadiff_rt_engines'), tiny_model(uem_gain=20.0), MAX_BATCH))")
bash scripts/cpp_example.sh "$ENGINES"
stage_done cpp-example

if [ "${ADADIFF_SKIP_SANITIZE:-0}" != "1" ]; then
  OV=$(python -c "import openvino,os;print(os.path.dirname(openvino.__file__))")/cmake
  # CUDA off: the sanitizers watch the CPU path, and the main build above already compiled every CUDA arch.
  # Debug (-O0): unoptimized code keeps every access the sanitizers check, and builds in 77 s on this
  # 2-core VM against about 250 s for RelWithDebInfo (whose CI stage took 368 s, 107 s of it tests;
  # at -O0 the tests take 127 s).
  cmake -S . -B build/asan -DADADIFF_SANITIZE=ON -DADADIFF_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug -DOpenVINO_DIR="$OV" \
    -Dpybind11_DIR="$(python -c 'import pybind11;print(pybind11.get_cmake_dir())')" \
    -DPython_EXECUTABLE="$(command -v python)" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/build/asan/lib" >/dev/null
  cmake --build build/asan -j2
  LD_PRELOAD="$PWD/build/asan/libno_deepbind.so $(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  PYTHONPATH="$PWD/build/asan/lib" ADADIFF_RT_REQUIRED=1 \
    python -m pytest -q tests/test_runtime.py tests/test_runtime_refusals.py tests/test_runtime_dlpack.py
  stage_done sanitizers
fi
