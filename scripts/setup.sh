#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root): Fashion-MNIST, the C++ toolchain, the Python
# packages (torch pinned to the CPU build), the adadiff_rt extension built from csrc/, and the serving
# venv (Triton through PyTriton; README "Serving").
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

# nlohmann-json3-dev and libssl-dev: adadiff_rt reads manifest.json with nlohmann/json and hashes
# every engine file with OpenSSL's SHA-256; python3-venv: the serving venv (below).
apt_packages=(dataset-fashion-mnist cmake g++ make nlohmann-json3-dev libssl-dev python3-venv)
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
# The package as one wheel, built once: adadiff_rt is compiled in pip's isolated build environment against
# the openvino wheel pinned in pyproject.toml (the same version it installs for run time). The same wheel
# goes into `python` (with pytest and tritonclient) and into the serving venv below.
rm -rf build/wheel
python -m pip wheel -q --no-deps -w build/wheel .
wheel=$(ls build/wheel/adadiff-*.whl)
install_wheel() {  # PYTHON EXTRA: the dependencies and the extra, then this very build of the package
  "$1" -m pip install -q "$wheel[$2]"
  "$1" -m pip install -q --no-deps --force-reinstall "$wheel"
}
install_wheel python test
python -c "import adadiff_rt; print('adadiff_rt', adadiff_rt.__file__, 'openvino:', adadiff_rt.has_openvino, 'cuda:', adadiff_rt.has_cuda, 'tensorrt:', adadiff_rt.has_tensorrt)"

# Serving: PyTriton's backend stub loads the system's libpython, so the server runs in a venv made from the
# system's own python3 (not from a separately built `python`); `serve` and `loadtest` find it here and run
# themselves in it. ADADIFF_SERVE_VENV moves it.
serve_venv=${ADADIFF_SERVE_VENV:-$HOME/.cache/adadiff/serve-venv}
[ -x "$serve_venv/bin/python" ] || /usr/bin/python3 -m venv "$serve_venv"
"$serve_venv/bin/python" -m pip install -q -r requirements.txt
install_wheel "$serve_venv/bin/python" serve
(cd / && "$serve_venv/bin/python" -c "import sys, adadiff_rt; from adadiff_export.serve.interpreter import pytriton_problem
p = pytriton_problem(); assert p is None, p; print('serving venv', sys.prefix, 'Python', sys.version.split()[0])")
