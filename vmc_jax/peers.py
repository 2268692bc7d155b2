"""Bounded waits on the other processes of a multi-process job, each ending in one line.

JAX's coordination service ends a process with a C++ check failure and a stack dump when the
processes do not all join (``initialization_timeout``, 300 s by default) or a peer stops
sending heartbeats (100 s), and this jaxlib cannot hand that to Python (a
``missed_heartbeat_callback`` aborts on ``std::bad_cast``). So the job keeps deadlines of its
own, shorter than JAX's: a timer on the join, then a thread that publishes this process's
heartbeat in the coordination service's key-value store and watches the others'. A peer
silent for ``heartbeat_timeout_s``, or a coordinator that cannot be reached, ends this process
with one line naming the process that went away (exit code 1).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax
from jax._src import distributed

JAX_MARGIN_S = 30  # JAX's own deadlines are this much later than the job's, so the job's fire first
LOST_PEER = 1  # exit code
_KEY = "vmc_jax/heartbeat/"


def _stop(message: str, linger_s: float = 0) -> None:
    """One line, and exit after `linger_s` without waiting for the peers at JAX's shutdown barrier."""
    print(f"vmc-jax: error: {message}", file=sys.stderr, flush=True)
    time.sleep(linger_s)
    os._exit(LOST_PEER)


def join(coordinator: str | None, num_processes: int | None, process_id: int | None,
         join_timeout_s: float, heartbeat_timeout_s: float) -> None:
    """``jax.distributed.initialize`` within ``join_timeout_s``, then the heartbeat watch."""
    joined = threading.Event()

    def join_deadline():
        if not joined.wait(join_timeout_s):
            _stop(f"the {num_processes or 'expected'} processes of the job did not all join within "
                  f"{join_timeout_s:g} s (coordinator {coordinator or 'found by JAX'}); "
                  "is every process started, with the same --coordinator and --num_processes?")

    threading.Thread(target=join_deadline, name="vmc_jax-join", daemon=True).start()
    jax.distributed.initialize(coordinator, num_processes, process_id,
                               initialization_timeout=int(join_timeout_s) + JAX_MARGIN_S,
                               heartbeat_timeout_seconds=int(heartbeat_timeout_s) + JAX_MARGIN_S)
    joined.set()
    threading.Thread(target=_watch, args=(distributed.global_state.client, heartbeat_timeout_s),
                     name="vmc_jax-heartbeat", daemon=True).start()


def _watch(client, timeout_s: float) -> None:
    """Beats every ``timeout_s / 4`` and stops this process when a peer's beat is older than ``timeout_s``."""
    me, count = jax.process_index(), jax.process_count()
    last_seen = {peer: (None, time.monotonic()) for peer in range(count) if peer != me}
    beat = 0
    while True:
        beat += 1
        try:
            client.key_value_set(f"{_KEY}{me}", str(beat), allow_overwrite=True)
            beats = dict(client.key_value_dir_get(_KEY))
        except Exception as e:  # noqa: BLE001 - any failure to reach the coordinator ends the job
            _stop(f"process {me} of {count} lost the job's coordinator (process 0): "
                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")
        now = time.monotonic()
        for peer, (value, since) in last_seen.items():
            current = beats.get(f"{_KEY}{peer}")
            if current != value:
                last_seen[peer] = (current, now)
            elif now - since > timeout_s:
                # Process 0 hosts the coordination service, whose end aborts the others: it lingers
                # so that they see the lost peer (within a beat) and stop with their own line first.
                _stop(f"process {peer} of {count} went away: no heartbeat for {timeout_s:g} s; "
                      f"process {me} stops too", linger_s=timeout_s / 2 if me == 0 else 0)
        time.sleep(timeout_s / 4)
