#!/usr/bin/env bash
# Runs a vmc-jax command as an N-process job on this machine, exactly as a pod slice runs it:
# every process runs the same command, joined through a coordinator on localhost, each with
# DEVICES (default 2) CPU devices; the mesh spans all N x DEVICES of them.
#
#   scripts/local_multihost.sh N vmc-jax-command [arguments...]
#   e.g. scripts/local_multihost.sh 2 train --config configs/vmc.py:tiny --workdir workdirs/tiny/mh
#
# Each process logs to $LOGDIR/process_<i>.log (default: a new temporary folder); the script
# exits 1 if any process fails, and 3 if they stopped on a signal with their checkpoint (vmc-jax's
# exit 3: the processes agree on the step, so the others are left to finish theirs). Every process runs in a process group of its own, and
# whenever the script ends (a process failed, Ctrl-C, SIGTERM, any exit) it stops all of them
# and their children: SIGTERM to each group, then SIGKILL to what is left after GRACE seconds
# (default 10).
set -euo pipefail
if (($# < 2)); then
  echo "usage: $0 N vmc-jax-command [arguments...]" >&2
  exit 2
fi
num_processes=$1
shift
devices=${DEVICES:-2}
grace=${GRACE:-10}
port=${PORT:-$((20000 + RANDOM % 20000))}
logdir=${LOGDIR:-$(mktemp -d)}
mkdir -p "$logdir"

pids=()
stop_all() {  # SIGTERM to every process group started here, SIGKILL after $grace s to what is left
  local pid waited=0
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    while kill -0 -- "-$pid" 2>/dev/null && ((waited < grace * 10)); do
      sleep 0.1
      waited=$((waited + 1))
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
}
trap 'stop_all' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    setsid vmc-jax "$@" --coordinator="localhost:$port" --num_processes="$num_processes" --process_id="$i" \
    >"$logdir/process_$i.log" 2>&1 &
  pids+=($!)
done

status=0
for _ in "${pids[@]}"; do
  code=0
  wait -n || code=$?
  if ((code == 3)); then  # stopped by a signal after writing its checkpoint
    status=3
  elif ((code)); then  # one process failed: the others would wait on it, stop them
    status=1
    stop_all
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
