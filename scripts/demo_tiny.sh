#!/usr/bin/env bash
# The whole VMC flow on a tiny random Show-1 pipeline that the project builds itself: make it
# (PyTorch hub format), convert it to Flax, tune on the bundled clip, generate, export the delta.
# Runs on a CPU in a few minutes; outputs land in the folder given (default workdirs/tiny).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workdirs/tiny}
vmc-jax tiny-pipeline "$out/pipeline_hub" --overwrite
vmc-jax convert "$out/pipeline_hub" "$out/pipeline_flax" --overwrite
vmc-jax train --config configs/vmc.py:tiny --workdir "$out/run" --config.pretrained="$out/pipeline_flax"
vmc-jax generate --workdir "$out/run" --prompt "a blue square is moving on the snow"
vmc-jax export --workdir "$out/run" --out "$out/run/vmc_delta.safetensors" --overwrite
echo "Done. Samples: $out/run/samples/, metrics: $out/run/metrics.jsonl, delta: $out/run/vmc_delta.safetensors"
