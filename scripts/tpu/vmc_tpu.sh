#!/usr/bin/env bash
# VMC on a Cloud TPU VM slice: create it, install the project on every worker, mount a shared
# bucket, launch `vmc-jax train` on all workers at once (one process per host; JAX discovers the
# slice), follow the log, fetch results, delete it.
#
#   scripts/tpu/vmc_tpu.sh [--dry-run] COMMAND [extra vmc-jax arguments for `train`]
#
# COMMAND: plan | create | install | mount | train | logs | fetch | delete | up (create, install, mount, train)
# plan runs here, before any VM exists: `vmc-jax plan` compiles the job's programs for the slice's
# topology (needs `pip install -e ".[tpu]"`) and says whether they fit its chips; extra arguments go to it.
# --dry-run prints the command lines instead of running them.
#
# Settings (environment variables):
#   TPU_NAME (vmc-tpu)  ZONE (us-central2-b)  ACCELERATOR_TYPE (v4-16)  RUNTIME_VERSION (tpu-ubuntu2204-base)
#   PROJECT (gcloud's default)  QUEUED=1: ask through a queued resource  SPOT=1: spot capacity
#   BUCKET (gs://...): mounted with gcsfuse at MOUNT (/mnt/vmc) on every worker; checkpoints and the
#     workdir must live there, since every host writes its part of each checkpoint
#   TOPOLOGY (from ACCELERATOR_TYPE: v5litepod-4 -> v5e:2x2, v4-16 -> v4:2x2x2, v5p-8 -> v5p:2x2x1; for plan)
#   CONFIG (configs/vmc.py:car_forest)  WORKDIR ($MOUNT/workdirs/<config arg>)
#   PRETRAINED ($MOUNT/checkpoints/show-1-base)  VIDEO ($MOUNT/videos/<config arg>)  RESULTS (./results)
set -euo pipefail

dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
command=${1:-}
shift || true

TPU_NAME=${TPU_NAME:-vmc-tpu}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-16}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
MOUNT=${MOUNT:-/mnt/vmc}
CONFIG=${CONFIG:-configs/vmc.py:car_forest}
clip=${CONFIG##*:}
WORKDIR=${WORKDIR:-$MOUNT/workdirs/$clip}
PRETRAINED=${PRETRAINED:-$MOUNT/checkpoints/show-1-base}
VIDEO=${VIDEO:-$MOUNT/videos/$clip}
RESULTS=${RESULTS:-./results}
project=()
if [[ -n ${PROJECT:-} ]]; then project=(--project="$PROJECT"); fi

run() {  # prints the command in --dry-run mode, runs it otherwise
  if ((dry_run)); then printf '%q ' "$@"; echo; else "$@"; fi
}

on_workers() {  # the command line $2 on worker(s) $1 ("all" or an index)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${project[@]}" --worker="$1" --command="$2"
}

topology() {  # the `vmc-jax plan --target` of ACCELERATOR_TYPE (TOPOLOGY if set): v5e by chips, v4 / v5p by cores
  if [[ -n ${TOPOLOGY:-} ]]; then echo "$TOPOLOGY"; return; fi
  local kind=${ACCELERATOR_TYPE%-*} count=${ACCELERATOR_TYPE##*-} shape=""
  case $kind in
    v5litepod) case $count in 1) shape=1x1 ;; 4) shape=2x2 ;; 8) shape=2x4 ;; 16) shape=4x4 ;; 32) shape=4x8 ;;
                 64) shape=8x8 ;; 128) shape=8x16 ;; 256) shape=16x16 ;; esac; kind=v5e ;;
    v4|v5p) case $count in 8) shape=2x2x1 ;; 16) shape=2x2x2 ;; 32) shape=2x2x4 ;; 64) shape=2x4x4 ;;
              128) shape=4x4x4 ;; esac ;;
  esac
  if [[ -z $shape ]]; then
    echo "$0: no topology known for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set TOPOLOGY (e.g. v5e:2x2, v4:2x2x1)" >&2
    return 2
  fi
  echo "$kind:$shape"
}

create() {
  local capacity=()
  if [[ -n ${SPOT:-} ]]; then capacity=(--spot); fi
  if [[ -n ${QUEUED:-} ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME-request" --node-id="$TPU_NAME" --zone="$ZONE" \
      "${project[@]}" --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${capacity[@]}"
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" "${project[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${capacity[@]}"
  fi
}

install() {  # this checkout (committed files) to every worker, then the package with TPU JAX
  local archive=/tmp/vmc_jax_src.tar.gz
  run git -C "$(dirname "$0")/../.." archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:~/vmc_jax_src.tar.gz" --zone="$ZONE" "${project[@]}" --worker=all
  on_workers all "mkdir -p ~/vmc_jax && tar -xzf ~/vmc_jax_src.tar.gz -C ~/vmc_jax && pip install -q 'jax[tpu]' -e ~/vmc_jax"
}

mount() {
  : "${BUCKET:?set BUCKET=gs://... (holds checkpoints/, videos/ and the workdirs)}"
  on_workers all "sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT && gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT"
}

train() {
  local args=(--config "$CONFIG" --workdir "$WORKDIR" --multihost --config.pretrained="$PRETRAINED"
              --config.video="$VIDEO" "$@")
  on_workers all "cd ~/vmc_jax && nohup vmc-jax train $(printf '%q ' "${args[@]}")> ~/vmc_train.log 2>&1 &"
}

case $command in
  plan) target=$(topology); run vmc-jax plan --config "$CONFIG" --target="$target" "$@" ;;
  create) create ;;
  install) install ;;
  mount) mount ;;
  train) train "$@" ;;
  logs) on_workers 0 "tail -n 100 -f ~/vmc_train.log" ;;
  fetch) run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$WORKDIR" "$RESULTS" --zone="$ZONE" "${project[@]}" --worker=0 ;;
  delete)
    if [[ -n ${QUEUED:-} ]]; then
      run gcloud compute tpus queued-resources delete "$TPU_NAME-request" --zone="$ZONE" "${project[@]}" --force --quiet
    else
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" "${project[@]}" --quiet
    fi ;;
  up) create; install; mount; train "$@" ;;
  *) echo "usage: $0 [--dry-run] {plan|create|install|mount|train|logs|fetch|delete|up} [vmc-jax plan / train arguments]" >&2
     exit 2 ;;
esac
