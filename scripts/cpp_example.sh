#!/usr/bin/env bash
# The C++ user's path, end to end: build adadiff_rt's C++ library alone (no Python), install it into
# a temporary prefix, build examples/cpp against that install with find_package(adadiff_rt), and
# sample from an engines folder with it.
#
#     bash scripts/cpp_example.sh ENGINES_DIR [OUT.pgm]
set -euo pipefail
cd "$(dirname "$0")/.."
ENGINES="${1:?usage: bash scripts/cpp_example.sh ENGINES_DIR [OUT.pgm]}"
OUT="${2:-build/cpp-example/samples.pgm}"
PREFIX="$(mktemp -d)"
trap 'rm -rf "$PREFIX"' EXIT

# The OpenVINO SDK inside the openvino wheel, as for the Python module.
OV="$(python -c "import openvino, os; print(os.path.dirname(openvino.__file__))")/cmake"
cmake -S . -B build/cpp -DCMAKE_BUILD_TYPE=Release -DADADIFF_PYTHON=OFF -DOpenVINO_DIR="$OV" >/dev/null
cmake --build build/cpp --parallel "$(nproc)"
cmake --install build/cpp --prefix "$PREFIX" >/dev/null
cmake -S examples/cpp -B build/cpp-example -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build build/cpp-example
build/cpp-example/adadiff_sample "$ENGINES" --n 4 --steps 10 --out "$OUT"
