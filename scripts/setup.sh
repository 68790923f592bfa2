#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root): Fashion-MNIST, the C++ toolchain, the Python
# packages (torch pinned to the CPU build), and the adadiff_rt extension built from csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

apt_packages=(dataset-fashion-mnist cmake g++ make)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

python -m pip install -q -r requirements.txt
# --no-build-isolation: the build needs the installed openvino wheel's CMake config (and no network).
python -m pip install -q --no-build-isolation .
python -c "import adadiff_rt; print('adadiff_rt', adadiff_rt.__file__, 'openvino:', adadiff_rt.has_openvino, 'cuda:', adadiff_rt.has_cuda, 'tensorrt:', adadiff_rt.has_tensorrt)"
