# Sourced on the GPU machine (device tool) after the kit's three calls:
#   source scripts/device_setup.sh
# Puts vLLM 0.26.0 + the route-logger delta on PYTHONPATH (/tmp/fork-site before the
# kit's /tmp/site) and keeps the stock one reachable as STOCK_VLLM_PYTHONPATH.
eval "$(bash "$([ -f .kit/c/install.sh ] && echo .kit/c/install.sh || echo /tmp/kit/install.sh)")"
if [ ! -f /tmp/fork-site/vllm/model_executor/layers/fused_moe/route_logger.py ]; then
  rm -rf /tmp/fork-site && mkdir -p /tmp/fork-site && cp -a /tmp/site/vllm /tmp/fork-site/
  python3 fork/build.py --onto /tmp/fork-site --version 0.26.0 >/dev/null
fi
if [ -d .whl ] && ! python3 -c "import pytest, duckdb" 2>/dev/null; then  # the tests; analysis/ reads logs with duckdb
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
export STOCK_VLLM_PYTHONPATH=/tmp/site
export PYTHONPATH=/tmp/fork-site:/tmp/site:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
