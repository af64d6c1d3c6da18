#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what scripts/gpu-suite.sh installs on a GPU machine without internet:
# difftune's own wheel and the wheels of its dependencies that a machine holding only torch (and the
# usual scientific stack) lacks, for Python 3.12 on x86-64 Linux, plus diffusers' two example scripts.
#
#   scripts/gpu-wheels.sh [WHEELS_DIR=.whl] [PEERS_DIR=peer-scripts] [DIFFUSERS_CHECKOUT]
#
# Versions are the ones in constraints.txt. The example scripts come from a diffusers checkout
# (DIFFUSERS_CHECKOUT, a git directory or work tree); without one, put them into PEERS_DIR yourself:
# examples/dreambooth/train_dreambooth_lora_flux.py and examples/text_to_image/train_text_to_image_lora.py.
set -euo pipefail
WHEELS=${1:-.whl}
PEERS=${2:-peer-scripts}
CHECKOUT=${3:-}
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WHEELS" "$PEERS"
pin() { grep -i "^$1==" "$ROOT/constraints.txt" | head -1; }
# what the GPU image lacks or holds at another version (see /work/.library/device/KINDS.md for its package
# list): pure-Python wheels, then tokenizers (compiled). The image's own tokenizers (0.23.2) cannot read the
# T5 tokenizer that the bench's pipelines save with 0.23.3 (a GPU run failed every FLUX case on it).
PURE="diffusers datasets dill multiprocess peft importlib_metadata transformers"
SPECS=()
for name in $PURE; do SPECS+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$WHEELS" "${SPECS[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$WHEELS" "$(pin tokenizers)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$ROOT"
if [ -n "$CHECKOUT" ]; then
  for f in examples/dreambooth/train_dreambooth_lora_flux.py examples/text_to_image/train_text_to_image_lora.py; do
    git -C "$CHECKOUT" show "HEAD:$f" > "$PEERS/$(basename "$f")"
  done
fi
ls -la "$WHEELS" "$PEERS"
