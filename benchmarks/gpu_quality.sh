#!/usr/bin/env bash
# The quality rows (issue 15) on a lent GPU machine: the "cpu" profile's recipe, trained on the GPU
# (compare.py --device cuda: float32 without TF32, deterministic cuDNN), many runners at a time.
# As the device tool runs it: the working tree arrives with a .git that may be older than the code
# (so COMPARE_COMMIT names the commit for the rows), the Fashion-MNIST files in .fm/
# and torch-pruning's wheel in .whl/ (both ignored by .git/info/exclude here); rows, logs and the
# GPU's baselines are copied to OUT.
#
#   COMPARE_COMMIT=$(git rev-parse HEAD) SECONDS_LEFT=540 bash benchmarks/gpu_quality.sh "$OUT"
#
# A smoke run (quick profile, in a copy of benchmarks/ so its rows go nowhere) comes first: when the
# code fails on that machine, the script stops within a minute instead of spending the lease.
set -u -o pipefail
out=${1:?usage: gpu_quality.sh OUTDIR}
end=$(( $(date +%s) + ${SECONDS_LEFT:-540} ))
mkdir -p /usr/share/datasets/fashion-mnist && cp .fm/*.gz /usr/share/datasets/fashion-mnist/ || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site .whl/*.whl . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
(cd /tmp && python3 -c "import torch, torch_pruning, fxtucker; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'torch_pruning', torch_pruning.__version__, 'cores', __import__('os').cpu_count())") | tee -a "$out/gpu.txt" || exit 1

rm -rf /tmp/smoke && mkdir -p /tmp/smoke && cp -r benchmarks /tmp/smoke/ && rm -rf /tmp/smoke/benchmarks/results/*.json /tmp/smoke/benchmarks/cache
python3 /tmp/smoke/benchmarks/compare.py --exp quality --profile quick --device cuda --workers 6 --stop-after 90 \
  --seeds 0 --settings baseline "2x kd" "evbmf ranks" --methods uncompressed funnel uniform torch-pruning musco vbmf \
  2>&1 | tee "$out/smoke.log" || { tar czf "$out/smoke_logs.tgz" -C /tmp/smoke/benchmarks runs; exit 1; }
python3 /tmp/smoke/benchmarks/compare.py --table quality | tail -12 | tee -a "$out/smoke.log"

left=$(( end - $(date +%s) - 45 ))  # the copies below need a little time
echo "main runs: $left s"
common=(--exp quality --profile cpu --device cuda --stop-after "$left" --methods uncompressed funnel funnel-cut uniform torch-pruning musco vbmf)
python3 benchmarks/compare.py "${common[@]}" --workers "${R20_WORKERS:-11}" --models resnet20 --seeds 0 1 2 3 4 5 6 7 \
  --settings baseline "2x kd" "3x kd" "4x kd" "evbmf ranks" > "$out/pool_resnet20.log" 2>&1 &
python3 benchmarks/compare.py "${common[@]}" --workers "${VGG_WORKERS:-3}" --models vgg_small --seeds 0 1 2 \
  --settings baseline "2x kd" "3x kd" > "$out/pool_vgg_small.log" 2>&1 &
wait
cp benchmarks/results/quality.json "$out/quality.json"
tar czf "$out/pool_logs.tgz" benchmarks/runs
# one archive per model: all in one came to over the 16 MiB a returned file may have
for m in resnet20 vgg_small; do tar czf "$out/baselines_$m.tgz" benchmarks/cache/cpu/$m-*-cuda/baseline_state_dict.pt; done
tail -n 3 "$out/pool_resnet20.log" "$out/pool_vgg_small.log"
