#!/usr/bin/env bash
# The GPU paths run for real on a CUDA machine, in one pass that fits a short lease:
#   env    what torch, faiss and open_clip see (faiss runs on the GPU only where faiss-gpu loads)
#   demo   the whole demo pipeline from an empty store (bf16 training, float16 teacher features)
#   ddp    the train stage again for 60 steps under torchrun with one process (DDP over nccl, bf16)
#   bf16   60 steps without torchrun (train.seed=1: the ddp student of seed 0 is stored and would be reused)
#   fp32   those 60 steps with train.amp=false (each log's progress bar gives steps/s)
#   tests  the tests that run on both CPU and GPU
# Usage: bench/gpu_check.sh OUT_DIR [SECONDS]. Each step's log, a summary line per step (exit code, seconds) and a
# GPU memory trace land in OUT_DIR; a step that would start with too little of SECONDS (default 420) left is skipped.
# Every command pays 20-25 s of start-up (imports, Prefect's temporary server) before its stage begins.
set -uo pipefail
out="${1:?usage: bench/gpu_check.sh OUT_DIR [SECONDS]}"
deadline=$((SECONDS + ${2:-420}))
py="${PYTHON:-python3}"
mkdir -p "$out"
work="$(mktemp -d)"
export CLIPS4_STORE="$work/store" PREFECT_HOME="$work/prefect" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -lms 500 >"$out/gpu.csv" 2>&1 &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

step() {  # step NAME MAX_SECONDS COMMAND...: run it with at most MAX_SECONDS, never past the deadline
  local name=$1 limit=$2 left=$((deadline - SECONDS)) t0=$SECONDS rc
  shift 2
  ((left < limit)) && limit=$left
  if ((limit < 20)); then echo "$name skipped: ${left}s left" | tee -a "$out/summary.txt"; return; fi
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/summary.txt"
}

run=("$py" -m clips4.flows.cli run --preset demo)
step env 60 "$py" -c "
import faiss, open_clip, prefect, torch, zarr
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('faiss', faiss.__version__, 'gpus', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 'cpu build')
print('open_clip', open_clip.__version__, 'prefect', prefect.__version__, 'zarr', zarr.__version__)
import clips4.flows.cli, clips4.tasks.train, clips4.tasks.cluster"
step demo 180 "${run[@]}"
step ddp 60 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 "${run[@]:1}" --stages train \
  --set train.steps=60
step bf16 50 "${run[@]}" --stages train --set train.steps=60 --set train.seed=1
step fp32 50 "${run[@]}" --stages train --set train.steps=60 --set train.seed=1 --set train.amp=false
step tests 90 "$py" -m pytest -q -n 4 -p no:cacheprovider tests -k "cuda or patch_consistency or more_processes"
find "$CLIPS4_STORE" -maxdepth 4 \( -name '*.md' -o -name '*.csv' -o -name '*.json' \) -print0 |
  tar czf "$out/store_tables.tgz" --null -T - 2>/dev/null
rm -rf "$work"
