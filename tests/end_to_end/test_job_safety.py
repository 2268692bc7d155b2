"""The job layer under bad input and faults (issue 11's table): each case fails fast, in one line, and
leaves no non-finite checkpoint, no second run in a workdir, no overwritten file, no silent truncation."""

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import FAST_COMPILE_ENV, REPO, tiny_config

from vmc_jax import cli, prompts
from vmc_jax.errors import JobError, TrainingDiverged
from vmc_jax.hub import text_loading
from vmc_jax.hub.conversion import read_state_dict
from vmc_jax.jobs import checkpoints, config as jobs_config, generate, tune, workdir
from vmc_jax.jobs.export import export_tuned

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def trained(tiny_pipeline_flax, tmp_path_factory):
    """A workdir after 2 tuning steps, checkpointed at steps 1 and 2."""
    job = str(tmp_path_factory.mktemp("job"))
    config = tiny_config(tiny_pipeline_flax, steps=2)
    config.train.checkpoint_every = 1
    tune.train_and_evaluate(config, job)
    return config, job


def saved_state(job, step):
    """The state a workdir's checkpoint step holds, as writable numpy arrays."""
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job))
    return jax.tree.map(np.array, store.manager.restore(step, args=ocp.args.StandardRestore()))


def leaves_of_checkpoints(job):
    steps = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(job)).manager.all_steps()
    return {step: jax.tree.leaves(saved_state(job, step)) for step in steps}


def test_non_finite_run_stops_with_finite_checkpoints_only(tiny_pipeline_flax, tmp_path):
    """lr=1e30: step 1 is finite (weights near 1e30), step 2 is not; the run stops naming it."""
    config = tiny_config(tiny_pipeline_flax, steps=4)
    config.train.lr, config.train.checkpoint_every = 1e30, 1
    with pytest.raises(TrainingDiverged, match=r"^step 2: the loss or the gradients are not finite"):
        tune.train_and_evaluate(config, str(tmp_path))
    saved = leaves_of_checkpoints(str(tmp_path))
    assert sorted(saved) == [1]
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in saved[1])
    assert not os.path.exists(tmp_path / workdir.LOCK_FILE)


def test_skip_policy_counts_non_finite_steps_and_keeps_the_weights(tiny_pipeline_flax, tmp_path, caplog):
    config = tiny_config(tiny_pipeline_flax, steps=3)
    config.train.lr, config.train.checkpoint_every, config.train.non_finite = 1e30, 1, "skip"
    with caplog.at_level(logging.WARNING):
        state = tune.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 3
    assert "skipped 2 non-finite steps (first: step 2)" in caplog.text
    saved = leaves_of_checkpoints(str(tmp_path))
    assert sorted(saved) == [2, 3]  # the newest two kept
    for a, b in zip(saved[2], saved[3]):  # step 3 was skipped: only the step counter and rng moved
        a, b = np.asarray(a), np.asarray(b)
        assert np.all(np.isfinite(b))
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(a, b)


def test_export_refuses_non_finite_tensors(trained, tmp_path):
    config, job = trained
    broken = str(tmp_path / "job")
    shutil.copytree(job, broken)
    state = saved_state(broken, 2)
    jax.tree.leaves(state["tuned"])[0][...] = np.nan
    store = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(broken))
    store.save(3, state)
    store.wait()
    with pytest.raises(JobError, match=r"checkpoint step 3 .* has non-finite values in 1 tensors \(first: "):
        export_tuned(config, broken, str(tmp_path / "delta.safetensors"))
    assert not os.path.exists(tmp_path / "delta.safetensors")


def test_a_second_training_run_on_a_busy_workdir_is_refused(trained, tmp_path):
    config, _ = trained
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with open(tmp_path / workdir.LOCK_FILE, "w") as f:
            json.dump({"pid": holder.pid, "host": socket.gethostname()}, f)
        with pytest.raises(JobError, match=rf"{tmp_path} is in use by a training run \(pid {holder.pid} on "):
            tune.train_and_evaluate(config, str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not os.path.exists(tmp_path / workdir.CONFIG_FILE)  # refused before writing anything


def test_a_training_run_refused_for_its_video_writes_nothing(tiny_pipeline_flax, tmp_path):
    config = tiny_config(tiny_pipeline_flax)
    config.data.num_frames = 1000
    (tmp_path / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(ValueError, match=r"has \d+ frames; num_frames=1000"):
        tune.train_and_evaluate(config, str(tmp_path))
    assert listing(tmp_path) == before  # no config.json, prompt_embeddings.npz or lock


def test_a_stale_lock_is_taken_over_and_released(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(tmp_path / workdir.LOCK_FILE, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
    with caplog.at_level(logging.WARNING), workdir.TrainLock(str(tmp_path)):
        with open(tmp_path / workdir.LOCK_FILE) as f:
            assert json.load(f) == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(JobError, match="in use by a training run"):  # even by this same process
            workdir.TrainLock(str(tmp_path)).__enter__()
    assert f"stale lock {tmp_path / workdir.LOCK_FILE} of process {dead.pid}" in caplog.text
    assert not os.path.exists(tmp_path / workdir.LOCK_FILE)


@pytest.mark.parametrize("name, message", [
    ("notes.py", r"--out '.*notes.py': the delta is written as safetensors; name it \*.safetensors"),
    ("delta.safetensors", r"delta.safetensors exists; pass --overwrite to replace it"),
])
def test_export_never_replaces_a_file_unasked(trained, tmp_path, name, message):
    config, job = trained
    target = tmp_path / name
    target.write_text("precious")
    with pytest.raises((ValueError, FileExistsError), match=message):
        export_tuned(config, job, str(target))
    assert target.read_text() == "precious"


def test_export_overwrites_when_asked_and_needs_neither_weights_nor_clip(trained, tmp_path):
    """The delta of the last step, from the UNet config and the checkpoint alone."""
    config, job = trained
    config = config.copy_and_resolve_references()
    config.video = str(tmp_path / "gone.gif")  # the training clip is not read
    target = tmp_path / "delta.safetensors"
    target.write_text("old")
    assert export_tuned(config, job, str(target), overwrite=True) == str(target)
    delta = {k: v() for k, v in read_state_dict(str(target)).items()}
    tuned = jax.tree.leaves(saved_state(job, 2)["tuned"])
    assert len(delta) == len(tuned) and all(np.all(np.isfinite(v)) for v in delta.values())


def test_generated_videos_never_replace_earlier_ones(tmp_path):
    """Prompts that map to one file name, written twice: every video keeps its own file."""
    video = np.zeros((2, 8, 8, 3), np.float32)
    first = generate.write_videos([video, video], ["a cat!", "a cat?"], str(tmp_path), fps=4)
    before = {p: open(p, "rb").read() for p in first}
    second = generate.write_videos([video + 0.5], ["a cat!"], str(tmp_path), fps=4)
    assert [os.path.basename(p) for p in first] == ["0_a_cat.gif", "0_a_cat.mp4", "1_a_cat.gif", "1_a_cat.mp4"]
    assert [os.path.basename(p) for p in second] == ["0_a_cat-2.gif", "0_a_cat-2.mp4"]
    assert all(open(p, "rb").read() == content for p, content in before.items())


def corrupt_step(job, step):
    """Truncates every data file of a checkpoint step, as a crash of the storage would."""
    root = os.path.join(workdir.checkpoints_dir(job), str(step))
    for folder, _, names in os.walk(root):
        if os.path.basename(folder) == "d":
            for name in names:
                with open(os.path.join(folder, name), "r+b") as f:
                    f.truncate(16)


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_in_one_line(trained, tmp_path, caplog):
    config, job = trained
    broken = str(tmp_path / "job")
    shutil.copytree(job, broken)
    corrupt_step(broken, 2)
    with caplog.at_level(logging.INFO):
        step, state = checkpoints.TrainCheckpoints(workdir.checkpoints_dir(broken)).restore_latest()
    assert step == 1 and int(state["step"]) == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and len(warnings[0]) < 400, warnings
    assert warnings[0].startswith(f"checkpoint step 2 in {workdir.checkpoints_dir(broken)} is unreadable (")
    with pytest.raises(JobError, match=r"checkpoint step 2 .* is unreadable .*; without --strict the newest intact"):
        checkpoints.TrainCheckpoints(workdir.checkpoints_dir(broken), strict=True).restore_latest()


def test_training_resumes_past_a_corrupt_latest_checkpoint(trained, tmp_path):
    """The unreadable step is set aside, the run resumes from step 1 and rewrites step 2."""
    config, job = trained
    broken = str(tmp_path / "job")
    shutil.copytree(job, broken)
    corrupt_step(broken, 2)
    resumed = tune.train_and_evaluate(config, broken)
    assert int(resumed.step) == 2
    assert os.listdir(workdir.checkpoints_dir(broken) + ".unreadable") == ["2"]
    original, again = leaves_of_checkpoints(job), leaves_of_checkpoints(broken)
    for a, b in zip(original[2], again[2]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


FULL_DISK = """
import resource, signal, sys
import numpy as np
from vmc_jax import cli
from vmc_jax.hub import converted_store
from vmc_jax.jobs import checkpoints
from vmc_jax.errors import JobError
cli._quiet_logs()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # every write past 4 KiB fails, as on a full disk
store = checkpoints.TrainCheckpoints(sys.argv[1])
try:
    store.save(1, {"w": np.random.default_rng(0).normal(size=(64, 1024)).astype(np.float32)})
    store.wait()
except JobError as e:
    print(e, file=sys.stderr)
"""


def test_a_storage_error_while_checkpointing_is_reported_once_and_briefly(tmp_path):
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path / "ckpt")], capture_output=True,
                            text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    lines = result.stderr.strip().splitlines()
    assert lines == [f"cannot write checkpoint step 1 to {tmp_path / 'ckpt'}: File too large (errno 27)"], \
        result.stderr[-3000:]


@pytest.mark.parametrize("field, value, message", [
    ("data.num_frames", 1, r"config.data.num_frames=1 must be an integer of at least 2"),
    ("train.lr", 0.0, r"config.train.lr=0.0 must be greater than 0"),
    ("data.height", 17, r"config.data.height=17 must be divisible by 2 \(the UNet in .*unet downsamples by 2\)"),
    ("train.loss", "cosine", r"config.train.loss='cosine' is not one of \['paper', 'official', 'l2', 'epsilon'\]"),
    ("inversion.method", "exact", r"config.inversion.method='exact' is not one of"),
    ("train.steps", 0, r"config.train.steps=0 must be an integer of at least 1"),
    ("train.non_finite", "ignore", r"config.train.non_finite='ignore' is not one of \['stop', 'skip'\]"),
    ("video", "/no/such/clip.mp4", r"config.video='/no/such/clip.mp4' does not exist"),
    ("train.lrr", 1e-3, r'config.train.lrr: unknown field; did you mean "train.lr"\?'),
    ("attention", "flash", r"config.attention='flash' is not one of \['auto', 'xla', 'blocked'"),
])
def test_bad_config_values_are_named(tiny_pipeline_flax, field, value, message):
    config = tiny_config(tiny_pipeline_flax)
    section, _, key = field.rpartition(".")
    with config.unlocked():
        setattr(config[section] if section else config, key, value)
    with pytest.raises(ValueError, match=message):
        jobs_config.Job.from_config(config)


def test_the_job_config_chooses_the_attention_core(tiny_pipeline_flax):
    config = tiny_config(tiny_pipeline_flax)
    config.attention = "blocked"
    model, _, _ = generate.load_keyframe_unet(config)
    assert model.attention_impl == "blocked"


def test_sampling_from_random_noise_ignores_the_clip_and_from_inverted_noise_follows_it(tiny_pipeline_flax,
                                                                                       tmp_path):
    """``sampling.init`` ("generate --init"): "random" starts every clip from the same seeded noise."""
    job = jobs_config.Job.from_config(tiny_config(tiny_pipeline_flax))
    model, params, scheduler = generate.load_keyframe_unet(job)
    texts = prompts.embed_prompts(job.pretrained, ["", "a cat"], str(tmp_path))
    clip = generate.training_clip(job)
    videos = {init: [generate.keyframe_videos(model, params, scheduler, c, texts, ["a cat"], job.inversion,
                                              dataclasses.replace(job.sampling, init=init), job.seed)[0]
                     for c in (clip, clip[::-1])] for init in jobs_config.SAMPLING_INITS}
    np.testing.assert_array_equal(*videos["random"])
    assert np.abs(videos["inverted"][0] - videos["inverted"][1]).max() > 0.1
    assert np.abs(videos["inverted"][0] - videos["random"][0]).max() > 0.1


def test_pretrained_must_be_a_converted_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no unet/"):
        jobs_config.Job.from_config(tiny_config(str(tmp_path)))


def test_a_prompt_longer_than_the_encoder_reads_is_warned_about(tiny_pipeline_flax, caplog):
    tokenizer = text_loading.load_tokenizer(tiny_pipeline_flax)
    encoder, params = text_loading.load_text_encoder(os.path.join(tiny_pipeline_flax, "text_encoder"))
    long_prompt = " ".join(["a red square is moving"] * 120)
    with caplog.at_level(logging.WARNING):
        text_loading.encode_prompts(tokenizer, encoder, params, ["short", long_prompt])
    ours = [r.getMessage() for r in caplog.records if "the text encoder reads only the first 77" in r.getMessage()]
    n_tokens = len(tokenizer(long_prompt.lower())["input_ids"])
    assert n_tokens > 77 and ours == [f"prompt {long_prompt[:60] + '...'!r} is {n_tokens} tokens; "
                                      "the text encoder reads only the first 77"]


def listing(folder):
    """Every path under ``folder`` (relative), with the content of each file."""
    found = {}
    for parent, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(parent, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read() if os.path.isfile(path) else None
    return found


def test_generate_without_a_checkpoint_needs_allow_untuned(tiny_pipeline_flax, tmp_path, monkeypatch):
    config = tiny_config(tiny_pipeline_flax)
    (tmp_path / "notes.txt").write_text("mine")
    before = listing(tmp_path)
    with pytest.raises(JobError, match=r"no checkpoint in .*: run `vmc-jax train` first, or pass --allow_untuned"):
        generate.generate_prompts(config, str(tmp_path), ["a cat"])
    assert listing(tmp_path) == before  # refused: nothing written (no empty checkpoints/)
    used = []
    monkeypatch.setattr(generate, "keyframe_videos", lambda model, params, *a: used.append(params) or [
        np.zeros((2, 8, 8, 3), np.float32)])
    written = generate.generate_prompts(config, str(tmp_path), ["a cat"], allow_untuned=True)
    assert [os.path.basename(p) for p in written] == ["0_a_cat.gif", "0_a_cat.mp4"]
    _, pretrained, _ = generate.load_keyframe_unet(config)
    for a, b in zip(jax.tree.leaves(used[0]), jax.tree.leaves(pretrained)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def vmc_jax_cli(*args):
    return subprocess.run([sys.executable, "-m", "vmc_jax.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **FAST_COMPILE_ENV, "PYTHONPATH": REPO})


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "configs/vmc.py:tiny", "--workdir", "{tmp}", "--config.train.lrr=1"],
     '--config.train.lrr: unknown config field; did you mean "train.lr"?'),
    (["train", "--config", "configs/vmc.py:tiny", "--workdir", "{tmp}", "--config.data.num_frames=1"],
     "config.data.num_frames=1 must be an integer of at least 2"),
    (["generate", "--workdir", "{tmp}", "--prompt", "a cat"],
     "no config given and no {tmp}/config.json (run `vmc-jax train` first)"),
    (["export", "--workdir", "{tmp}"], "--out is required"),
])
def test_cli_user_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    result = vmc_jax_cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"vmc-jax: error: {message.format(tmp=tmp_path)}"]


def test_cli_help_lists_the_commands_and_each_commands_flags_and_config_fields():
    top = vmc_jax_cli("--help")
    assert top.returncode == 0 and all(f"\n  {name} " in top.stdout for name in cli.COMMANDS), top.stdout
    assert vmc_jax_cli("-h").stdout == top.stdout
    bare = vmc_jax_cli()
    assert bare.returncode == 2 and bare.stdout == top.stdout
    train_help = vmc_jax_cli("train", "--help")
    assert train_help.returncode == 0 and train_help.stdout.startswith("usage: vmc-jax train --config")
    assert "  --workdir " in train_help.stdout and "  --join_timeout " in train_help.stdout
    assert "    train.lr = 0.0001" in train_help.stdout and "    cascade.sr1_window = 8" in train_help.stdout
    convert = vmc_jax_cli("convert", "--help")
    assert convert.returncode == 0 and "--overwrite" in convert.stdout and "config fields" not in convert.stdout


def test_cli_unknown_command_gets_the_closest_one_in_one_line():
    result = vmc_jax_cli("trian", "--workdir", "w")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "vmc-jax: error: unknown command 'trian'; did you mean \"train\"? (commands: " + ", ".join(cli.COMMANDS) + ")"]


def test_cli_verbose_adds_the_traceback(tmp_path):
    result = vmc_jax_cli("generate", "--workdir", str(tmp_path), "--prompt", "a cat", "--verbose")
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("vmc-jax: error: no config given")


def test_cli_plain_cpu_run_is_quiet(trained, tmp_path):
    """export on a finished workdir: the path on stdout, nothing on stderr (no TPU, PyTorch or fork notices)."""
    _, job = trained
    result = vmc_jax_cli("export", "--workdir", job, "--out", str(tmp_path / "d.safetensors"))
    assert result.returncode == 0 and result.stdout.strip() == str(tmp_path / "d.safetensors")
    assert result.stderr == "", result.stderr


def test_export_honours_the_umask(trained, tmp_path):
    """The delta is 0644 under umask 022 (safetensors' save_file made it 0600 whatever the umask)."""
    config, job = trained
    old = os.umask(0o022)
    try:
        out = export_tuned(config, job, str(tmp_path / "delta.safetensors"))
    finally:
        os.umask(old)
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o644)


def test_cli_export_to_a_place_it_cannot_write_is_one_line(trained):
    _, job = trained
    result = vmc_jax_cli("export", "--workdir", job, "--out", "/sys/delta.safetensors")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == ["vmc-jax: error: [Errno 13] Permission denied: '/sys/delta.safetensors'"]


def test_cli_diverged_run_exits_1_in_one_line(tiny_pipeline_flax, tmp_path):
    tiny = ["--config.data.num_frames=4", "--config.data.height=16", "--config.data.width=32",
            "--config.validation.every=0", "--config.train.checkpoint_every=1"]
    result = vmc_jax_cli("train", "--config", "configs/vmc.py:tiny", "--workdir", str(tmp_path), *tiny,
                         f"--config.pretrained={tiny_pipeline_flax}", "--config.train.lr=1e30")
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == ["vmc-jax: error: step 2: the loss or the gradients are not finite (config.train.lr=1e+30); "
                      "stopped, last checkpoint: step 1. Lower the learning rate, or set "
                      "config.train.non_finite=skip to skip such steps"], result.stderr[-3000:]


def safetensors_file(path, header_size=None, cut=0):
    """A one-tensor safetensors file ("w", 4x4 float32); optionally a forged header length or cut bytes."""
    from safetensors.numpy import save_file

    save_file({"w": np.ones((4, 4), np.float32)}, str(path))
    raw = path.read_bytes()
    if header_size is not None:
        raw = header_size.to_bytes(8, "little") + raw[8:]
    path.write_bytes(raw[:len(raw) - cut])
    return str(path)


@pytest.mark.parametrize("header_size, cut, message", [
    (10 ** 15, 0, r"cannot read safetensors header of '.*w.safetensors': header length 1000000000000000 but the "
                  r"file has \d+ bytes"),
    (None, 20, r"'.*w.safetensors': tensor 'w' ends at byte 64 of the data, which has only 44 bytes"),
])
def test_a_bad_safetensors_header_names_file_and_tensor(tmp_path, header_size, cut, message):
    with pytest.raises(ValueError, match=message):
        read_state_dict(safetensors_file(tmp_path / "w.safetensors", header_size, cut))


def tinny_error():
    """The message configs/vmc.py itself gives for an unknown clip, as a user should see it."""
    from configs import vmc as vmc_config

    with pytest.raises(ValueError) as error:
        vmc_config.get_config("tinny")
    return str(error.value)


@pytest.mark.parametrize("config, text, message", [
    ("configs/vmc.py:tinny", None, tinny_error()),
    ("{tmp}/missing.py", None, "no such file"),
    ("{tmp}/syntax.py", "def get_config(:\n", "line 1: invalid syntax"),
    ("{tmp}/raises.py", "def get_config():\n    return {}['clip']\n", "line 2: KeyError: 'clip'"),
])
def test_cli_config_file_errors_give_their_reason_in_one_line(tmp_path, config, text, message):
    config = config.format(tmp=tmp_path)
    if text is not None:
        (tmp_path / os.path.basename(config)).write_text(text)
    result = vmc_jax_cli("train", "--config", config, "--workdir", str(tmp_path / "job"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"vmc-jax: error: --config {config}: {message}"]
    assert not os.path.exists(tmp_path / "job")


def test_a_config_file_that_loads_is_run_once(tmp_path):
    """The CLI runs a config file again only to explain a failure: a file with side effects runs once."""
    counter = tmp_path / "calls"
    config = tmp_path / "counting.py"
    config.write_text(f"from configs import vmc\n\ndef get_config():\n"
                      f"    open({str(counter)!r}, 'a').write('called\\n')\n"
                      f"    config = vmc.get_config('tiny')\n    config.data.num_frames = 1\n    return config\n")
    result = vmc_jax_cli("train", "--config", str(config), "--workdir", str(tmp_path / "job"))
    assert result.returncode == 2 and "num_frames=1" in result.stderr, result.stderr[-3000:]
    assert counter.read_text().splitlines() == ["called"]


@pytest.fixture()
def unet_copy(tmp_path):
    """A writable copy of the keyframe UNet folder, and its weights file."""
    unet = tmp_path / "unet"
    shutil.copytree(os.path.join(REPO, "tests", "fixtures", "show1_keyframes", "unet"), unet)
    return unet, unet / "diffusion_pytorch_model.fp16.safetensors"


def test_cli_keeps_the_detail_of_an_error_on_a_second_line(tmp_path, unet_copy):
    """A checkpoint that does not fit the model: the missing key and its shape, not only "does not fit"."""
    from safetensors.numpy import save_file

    unet, weights = unet_copy
    save_file({k: v() for k, v in read_state_dict(str(weights)).items() if k != "conv_in.weight"}, str(weights))
    result = vmc_jax_cli("convert", str(unet), str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [f"vmc-jax: error: {weights} does not fit the model:",
                                          "  missing keys: conv_in.weight (expected (32, 3, 3, 3))"]


def test_cli_refuses_a_pickled_bin_without_running_it_or_advising_to(tmp_path, unet_copy):
    """torch's own message for it suggests weights_only=False, i.e. running the file's code."""
    unet, weights = unet_copy
    os.remove(weights)
    marker = tmp_path / "payload_ran"
    pickled_bin(unet / "diffusion_pytorch_model.bin", marker)
    result = vmc_jax_cli("convert", str(unet), str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"vmc-jax: error: {str(unet / 'diffusion_pytorch_model.bin')!r} holds pickled objects other than tensors; "
        "only a weights-only .bin is read (convert the checkpoint to safetensors)"]
    assert not marker.exists()


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def pickled_bin(path, marker):
    """A torch.save'd .bin holding a tensor and an object whose unpickling would create ``marker``."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[test]')")

    torch.save({"conv_in.weight": torch.zeros(1), "payload": _Payload(marker)}, str(path))
