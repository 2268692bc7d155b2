#!/usr/bin/env bash
# Runs a vmc-jax command as an N-process job on this machine, exactly as a pod slice runs it:
# every process runs the same command, joined through a coordinator on localhost, each with
# DEVICES (default 2) CPU devices; the mesh spans all N x DEVICES of them.
#
#   scripts/local_multihost.sh N vmc-jax-command [arguments...]
#   e.g. scripts/local_multihost.sh 2 train --config configs/vmc.py:tiny --workdir workdirs/tiny/mh
#
# Each process logs to $LOGDIR/process_<i>.log (default: a new temporary folder); the script
# exits non-zero if any process fails, and stops the others when one does.
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 N vmc-jax-command [arguments...]" >&2
  exit 2
fi
num_processes=$1
shift
devices=${DEVICES:-2}
port=${PORT:-$((20000 + RANDOM % 20000))}
logdir=${LOGDIR:-$(mktemp -d)}
mkdir -p "$logdir"

pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    vmc-jax "$@" --coordinator="localhost:$port" --num_processes="$num_processes" --process_id="$i" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT

status=0
for _ in "${pids[@]}"; do
  if ! wait -n "${pids[@]}"; then  # one process failed: the others would wait on it, stop them
    status=1
    kill "${pids[@]}" 2>/dev/null || true
    break
  fi
done
wait || true
if ((status)); then
  for ((i = 0; i < num_processes; i++)); do
    echo "--- process $i: $logdir/process_$i.log" >&2
    tail -n 5 "$logdir/process_$i.log" >&2
  done
fi
echo "logs: $logdir"
exit $status
