#!/usr/bin/env bash
# Run difftune's GPU suite on a fresh GPU machine that has Python, torch (CUDA) and torchvision but no
# internet and no difftune: install difftune and its missing dependencies from carried wheels
# (scripts/gpu-wheels.sh makes them), run `difftune bench --suite gpu`, and leave every figure in OUT.
#
#   scripts/gpu-suite.sh [WHEELS_DIR=.whl] [OUT=gpu-results] [PEERS_DIR=peer-scripts] [BUDGET_S=540]
#
# OUT gets results.md (the table), results.jsonl (every field), logs/, rows/, env.txt (card, driver,
# package versions) and OUT.tar.gz beside it (everything in one file, the large work files left out).
# Where only a few files come back from the GPU machine (the device tool returns 8), bring OUT.tar.gz.
set -uo pipefail
WHEELS=${1:-.whl}
OUT=${2:-gpu-results}
PEERS=${3:-peer-scripts}
BUDGET=${4:-540}
PY=${PYTHON:-python3}
SITE=${DIFFTUNE_SITE:-/tmp/difftune-site}
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
  || { echo "gpu-suite: installing the wheels from $WHEELS failed" >&2; exit 2; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c 'import torch, diffusers, transformers, peft, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda); print("diffusers", diffusers.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
PEER_ARGS=()
if [ -f "$PEERS/train_dreambooth_lora_flux.py" ]; then PEER_ARGS=(--peer-scripts "$PEERS"); fi
"$PY" -m difftune bench --suite gpu --out "$OUT" --budget "$BUDGET" "${PEER_ARGS[@]}"
status=$?
# the peer runs' own logs (the scripts' output) before the large work files go
for f in "$OUT"/work/*.log; do [ -f "$f" ] && cp "$f" "$OUT/logs/work-$(basename "$f")"; done
rm -rf "$OUT/work"
tar -czf "$OUT.tar.gz" -C "$(dirname "$OUT")" "$(basename "$OUT")"
exit $status
