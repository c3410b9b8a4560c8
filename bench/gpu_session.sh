#!/usr/bin/env bash
# One prepared run for a session that is lent a GPU (about 15 minutes of device time in all):
# the GPU-marked tests, then the cloud throughput benchmark at the InternVL3-8B shape (random
# weights), each under its own time limit so that both fit. Not yet run on a device: no session
# so far had one, so expect to fix a detail on first use.
#
# The device image has CUDA torch, grpcio and protobuf but not every project dependency, and
# nothing can be fetched there. Before the `run` call, on this machine, from the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     transformers==5.23.0 grpcio-health-checking==1.85.0 grpcio-reflection==1.85.0
# then `run` with carry [".whl"] and the command `bash bench/gpu_session.sh`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
SITE=/tmp/stitch-site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
fi
# The project's import names without installing it: stitchvlm.{shared,edge,cloud} -> the folders.
mkdir -p "$SITE/stitchvlm"
touch "$SITE/stitchvlm/__init__.py"
for part in shared edge cloud; do ln -sfn "$PWD/$part" "$SITE/stitchvlm/$part"; done
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

# 1. GPU-marked tests: batching in bf16/fp16 on CUDA, the device map, fp16 lean graph on the CUDA EP.
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_batching.py tests/test_device_map.py \
  tests/test_lean_decoder.py 2>&1 | tee "$OUT/gpu_tests.txt"

# 2. Throughput: long answers at the InternVL3-8B shape, bf16, concurrency 1/4/16/64.
cd bench
timeout 540 python3 cloud_throughput.py --device cuda --dtype bfloat16 --workloads long \
  --long-preset internvl3-8b --long-tokens 48 -n 64 >"../$OUT/throughput_8b.md" 2>"../$OUT/throughput_8b.err"
tail -1 "../$OUT/throughput_8b.md"
