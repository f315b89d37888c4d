#!/usr/bin/env bash
# Issue 5's GPU targets in one device call: thesis preset, batch 96, through the real loader, eager vs
# compiled + CUDA graphs, on the shards that `--export` wrote (the GPU image has torch, numpy, pyarrow and
# safetensors; duckdb travels as a wheel).
#
# Prepare here (CPU machine), once per session:
#   .venv/bin/python bench/train_throughput.py --export gpu_bench_data \
#       --extract ../shared/data/osm/liechtenstein-2013-08-03.osm.pbf
#   echo /gpu_bench_data/ >> .git/info/exclude; echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl duckdb
# Then: run(command="bash bench/gpu_train.sh", carry=["gpu_bench_data", ".whl"], timeout_s=540)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
STEPS=${STEPS:-200}
# compiled + CUDA graphs first: compiling the thesis model's forward and backward takes minutes (on CPU
# one graph served buckets 16-64 and a second 128, 106 s + 93 s; each bucket also records its own CUDA
# graph; the warm-up lines say how long), so it gets most of one 540 s call; eager is
# launch-bound (~1,000 tiles/s in FACTS) and needs ~2 x 2 x 200 steps x ~0.1 s
for mode in reduce-overhead none; do
  limit=370; [ "$mode" = none ] && limit=140
  timeout $limit python3 bench/train_throughput.py --sources gpu_bench_data --preset thesis --batch 96 \
    --steps "$STEPS" --device cuda --compile "$mode" --repeat 2 --flops 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/thesis-b96-$mode.txt"
done
