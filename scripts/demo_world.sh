#!/usr/bin/env bash
# VMC on the pretrained moving-shapes world model: tune on the bundled clip (a red square
# zigzagging over snow), generate the same motion with new shapes, colours and backgrounds,
# and measure it (centroid-track error, appearance, leakage; side-by-side gifs with the tracks).
# A few minutes on a 2-core CPU; outputs land in the folder given (default workdirs/world).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-workdirs/world}
vmc-jax world-pipeline "$out/pipeline_hub" --overwrite
vmc-jax convert "$out/pipeline_hub" "$out/pipeline_flax" --overwrite
vmc-jax train --config configs/vmc.py:world --workdir "$out/run" --config.pretrained="$out/pipeline_flax"
vmc-jax generate --workdir "$out/run"  # the config's prompts: configs/vmc.py WORLD_TARGETS
vmc-jax evaluate --workdir "$out/run" --overwrite
