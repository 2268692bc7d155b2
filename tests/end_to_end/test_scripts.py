"""The launch scripts: in --dry-run mode, the gcloud / vmc-jax command lines they would run; the local
multi-process launcher stopping what it started."""

import os
import shlex
import shutil
import signal
import subprocess
import time

import pytest

from helpers import REPO


def dry_run(script: str, *args: str, **env: str) -> list[list[str]]:
    """The script's printed commands, each split back into its arguments."""
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", script), "--dry-run", *args],
                            env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return [shlex.split(line) for line in result.stdout.splitlines()]


def test_tpu_up_creates_installs_mounts_and_trains_on_every_worker():
    create, archive, copy, install, mount, train = dry_run(
        "tpu/vmc_tpu.sh", "up", "--config.train.steps=10", TPU_NAME="t1", ZONE="z1", ACCELERATOR_TYPE="v5p-16",
        BUCKET="gs://b1", CONFIG="configs/vmc.py:bear")
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert {"--zone=z1", "--accelerator-type=v5p-16"} <= set(create)
    assert archive[:2] == ["git", "-C"] and "archive" in archive
    assert copy[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
    for ssh in (install, mount, train):
        assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1"] and "--worker=all" in ssh
    assert "jax[tpu]" in install[-1] and "gcsfuse --implicit-dirs b1 /mnt/vmc" in mount[-1]
    remote = shlex.split(train[-1].split("&&", 1)[1])
    assert remote[:5] == ["nohup", "vmc-jax", "train", "--config", "configs/vmc.py:bear"]
    assert {"--multihost", "--workdir", "/mnt/vmc/workdirs/bear", "--config.pretrained=/mnt/vmc/checkpoints/show-1-base",
            "--config.video=/mnt/vmc/videos/bear", "--config.train.steps=10"} <= set(remote)


@pytest.mark.parametrize("command, expected", [
    ("logs", ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vmc-tpu"]),
    ("fetch", ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "vmc-tpu:/mnt/vmc/workdirs/car_forest", "./results"]),
    ("delete", ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vmc-tpu"]),
])
def test_tpu_follow_fetch_delete(command, expected):
    (line,) = dry_run("tpu/vmc_tpu.sh", command)
    assert line[:len(expected)] == expected
    assert "--zone=us-central2-b" in line


@pytest.mark.parametrize("accelerator, target", [("v5litepod-4", "v5e:2x2"), ("v4-16", "v4:2x2x2"),
                                                 ("v5p-8", "v5p:2x2x1")])
def test_tpu_plan_compiles_for_the_slices_topology_here_before_any_vm(accelerator, target):
    (plan,) = dry_run("tpu/vmc_tpu.sh", "plan", "--json=plan.json", ACCELERATOR_TYPE=accelerator, CONFIG="configs/vmc.py:bear")
    assert plan == ["vmc-jax", "plan", "--config", "configs/vmc.py:bear", f"--target={target}", "--json=plan.json"]


def test_tpu_plan_of_an_unknown_slice_asks_for_its_topology():
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "tpu", "vmc_tpu.sh"), "--dry-run", "plan"],
                            env={**os.environ, "ACCELERATOR_TYPE": "v6e-8"}, capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert "no topology known for ACCELERATOR_TYPE=v6e-8; set TOPOLOGY" in result.stderr
    (plan,) = dry_run("tpu/vmc_tpu.sh", "plan", ACCELERATOR_TYPE="v6e-8", TOPOLOGY="v5e:2x4")
    assert plan[-1] == "--target=v5e:2x4"


def test_tpu_queued_spot_capacity():
    (create,) = dry_run("tpu/vmc_tpu.sh", "create", QUEUED="1", SPOT="1", PROJECT="p1")
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "vmc-tpu-request"]
    assert {"--node-id=vmc-tpu", "--project=p1", "--spot", "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
    (delete,) = dry_run("tpu/vmc_tpu.sh", "delete", QUEUED="1")
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "vmc-tpu-request"]


def test_tpu_mount_needs_a_bucket_and_unknown_commands_are_refused():
    env = {k: v for k, v in os.environ.items() if k != "BUCKET"}
    result = subprocess.run(["bash", os.path.join(REPO, "scripts/tpu/vmc_tpu.sh"), "--dry-run", "mount"],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "set BUCKET=gs://" in result.stderr
    result = subprocess.run(["bash", os.path.join(REPO, "scripts/tpu/vmc_tpu.sh"), "--dry-run", "launch"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "usage:" in result.stderr


def test_gpu_script_runs_train_over_local_gpus_or_joins_a_job():
    (train,) = dry_run("gpu/vmc_gpus.sh", "--config.train.steps=5")
    assert train[:5] == ["vmc-jax", "train", "--config", "configs/vmc.py:car_forest", "--workdir"]
    assert train[-1] == "--config.train.steps=5"
    install, train = dry_run("gpu/vmc_gpus.sh", COORDINATOR="h0:1234", NUM_PROCESSES="2", PROCESS_ID="1",
                             INSTALL="1")
    assert install[:3] == ["pip", "install", "-q"] and "jax[cuda12]" in install
    assert {"--coordinator=h0:1234", "--num_processes=2", "--process_id=1"} <= set(train)


# A stand-in for vmc-jax: starts a child, writes both pids, then sleeps; one process ignores SIGTERM,
# as a process whose SIGTERM handler is busy (JAX's preemption notifier) does.
FAKE_VMC_JAX = """#!/usr/bin/env bash
sleep 300 & echo $! >> "$PIDS"
echo $$ >> "$PIDS"
[[ "$*" == *--process_id=1* ]] && trap '' TERM
wait
"""


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs util-linux setsid")
def test_local_multihost_stops_every_process_it_started(tmp_path):
    """SIGTERM to the script ends both processes and their children, the one ignoring SIGTERM after GRACE."""
    (tmp_path / "vmc-jax").write_text(FAKE_VMC_JAX)
    (tmp_path / "vmc-jax").chmod(0o755)
    pids = tmp_path / "pids"
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PIDS": str(pids), "GRACE": "1",
           "LOGDIR": str(tmp_path / "logs")}
    script = subprocess.Popen(["bash", os.path.join(REPO, "scripts", "local_multihost.sh"), "2", "train"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 30
    while (not pids.exists() or len(pids.read_text().split()) < 4) and time.time() < deadline:
        time.sleep(0.05)
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == 4
    script.send_signal(signal.SIGTERM)
    assert script.wait(timeout=30) == 143
    time.sleep(0.2)
    alive = [pid for pid in started if os.path.exists(f"/proc/{pid}") and
             open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z"]
    assert not alive, alive


@pytest.mark.skipif(not shutil.which("setsid"), reason="needs util-linux setsid")
def test_local_multihost_lets_processes_that_stopped_with_a_checkpoint_finish(tmp_path):
    """A process's exit 3 (stopped by a signal, checkpoint written) is no failure: the other process is
    not killed while it finishes its own checkpoint, and the script exits 3."""
    (tmp_path / "vmc-jax").write_text("#!/usr/bin/env bash\n"
                                      'case "$*" in *--process_id=0*) exit 3;; esac\n'
                                      'sleep 1; echo finished > "$LOGDIR/late"; exit 3\n')
    (tmp_path / "vmc-jax").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "LOGDIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "local_multihost.sh"), "2", "train"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert (tmp_path / "logs" / "late").read_text() == "finished\n"
