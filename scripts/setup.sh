#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root): Fashion-MNIST, the C++ toolchain, the Python
# packages (torch pinned to the CPU build), and the adadiff_rt extension built from csrc/.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# nlohmann-json3-dev and libssl-dev: adadiff_rt reads manifest.json with nlohmann/json and hashes
# every engine file with OpenSSL's SHA-256.
apt_packages=(dataset-fashion-mnist cmake g++ make nlohmann-json3-dev libssl-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi

# torch first (pinned, CPU build), so that installing the package never chooses a torch for it.
python -m pip install -q -r requirements.txt
# The package, its dependencies and pytest; adadiff_rt is built in pip's isolated build environment
# against the openvino wheel pinned in pyproject.toml (the same version it installs for run time).
python -m pip install -q ".[test]"
python -c "import adadiff_rt; print('adadiff_rt', adadiff_rt.__file__, 'openvino:', adadiff_rt.has_openvino, 'cuda:', adadiff_rt.has_cuda, 'tensorrt:', adadiff_rt.has_tensorrt)"
