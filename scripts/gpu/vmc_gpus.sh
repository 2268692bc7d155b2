#!/usr/bin/env bash
# VMC on one host with several GPUs: one process drives every local GPU through the mesh
# (`config.mesh`: clips x data). With more hosts, run this on each with COORDINATOR=host:port,
# NUM_PROCESSES and PROCESS_ID set (jax.distributed), all pointing at a shared WORKDIR.
#
#   scripts/gpu/vmc_gpus.sh [--dry-run] [extra vmc-jax train arguments]
#
# Settings: CONFIG (configs/vmc.py:car_forest), WORKDIR (workdirs/<config arg>), PRETRAINED
# (checkpoints/show-1-base), VIDEO (videos/<config arg>), INSTALL=1: install JAX for CUDA 12 and
# the project first. --dry-run prints the command lines instead of running them.
set -euo pipefail
cd "$(dirname "$0")/../.."

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
run() {
  if ((dry_run)); then printf '%q ' "$@"; echo; else "$@"; fi
}

CONFIG=${CONFIG:-configs/vmc.py:car_forest}
clip=${CONFIG##*:}
args=(--config "$CONFIG" --workdir "${WORKDIR:-workdirs/$clip}"
      --config.pretrained="${PRETRAINED:-checkpoints/show-1-base}" --config.video="${VIDEO:-videos/$clip}")
if [[ -n ${COORDINATOR:-} ]]; then
  args+=(--coordinator="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}" --process_id="${PROCESS_ID:?}")
fi
if [[ -n ${INSTALL:-} ]]; then
  run pip install -q "jax[cuda12]" -e .
fi
run vmc-jax train "${args[@]}" "$@"
