"""Outputs under faults and concurrency (issue 20): temporary files no glob of final names picks up,
permissions from the umask, runs at once on one workdir that lose nothing, file names that fit,
evaluation results beside their samples, and no output replaced without --overwrite."""

import glob
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import threading

import ml_collections
import numpy as np
import pytest
from helpers import REPO, tiny_config

from vmc_jax import files, prompts, video_io, world
from vmc_jax.hub import text_loading
from vmc_jax.jobs import evaluate, generate, world_pretraining

# How long the first of two racing runs waits for the second to finish: long enough for an unlocked
# second run to finish (it writes two tiny files); a locked one waits for the first instead.
RACE_WAIT_S = 3.0


@pytest.fixture
def umask():
    """Sets the process umask for a test (``umask(value)``), restoring it after."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def test_temporary_files_match_no_final_name_and_never_stay(tmp_path):
    target = tmp_path / "delta.safetensors"
    with pytest.raises(RuntimeError):
        with files.atomic_path(str(target)) as tmp:
            pathlib.Path(tmp).write_bytes(b"half")
            assert glob.glob(str(tmp_path / "*.safetensors")) == []
            assert list(tmp_path.glob("*.safetensors")) == []  # pathlib's glob also matches hidden files
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    tensors = files.write_safetensors(str(tmp_path / "w.safetensors"), {"w": np.ones(3, np.float32)})
    video_io.save_video(np.zeros((2, 8, 8, 3), np.float32), str(tmp_path / "v.gif"))
    files.write_text_atomic(str(tmp_path / "t.json"), "{}")
    for path in (tensors, tmp_path / "v.gif", tmp_path / "t.json"):
        assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~mask), path
    with files.atomic_dir(str(tmp_path / "folder")):
        pass
    assert oct(os.stat(tmp_path / "folder").st_mode & 0o777) == oct(0o777 & ~mask)


def test_prompt_names_are_cut_by_bytes_and_rerun_with_a_suffix(tmp_path):
    """60 four-byte characters: a 240-byte name, which with "-2" and a stage suffix overflowed 255 bytes."""
    prompt = "\U0001d538" * 60
    video = np.zeros((2, 8, 8, 3), np.float32)
    for _ in range(2):
        written = generate.write_videos([video], [prompt], str(tmp_path), fps=4, suffix="_interpolation")
    assert [os.path.basename(p) for p in written] == [f"0_{prompt[:25]}_interpolation-2.{ext}" for ext in ("gif", "mp4")]


def test_a_file_name_the_file_system_cannot_hold_is_refused_up_front(tmp_path):
    files.check_name_fits(str(tmp_path / "not" / "yet"), "x" * 200)
    with pytest.raises(ValueError, match=r"file name 'x+' would take 256 bytes .* allows 255: shorten it"):
        files.check_name_fits(str(tmp_path / "not" / "yet"), "x" * 243)
    assert os.listdir(tmp_path) == []


class Race:
    """Two runs in threads, interleaved deterministically: the first call of a held function (made by
    the first run) waits, once started, until the second run is done, or RACE_WAIT_S."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.started, self.second_done = threading.Event(), threading.Event()

    def hold(self, module, name: str) -> None:
        real, calls = getattr(module, name), []

        def held(*args, **kwargs):
            calls.append(None)
            if len(calls) == 1:
                self.started.set()
                self.second_done.wait(RACE_WAIT_S)
            return real(*args, **kwargs)

        self.monkeypatch.setattr(module, name, held)

    def run(self, first, second) -> dict:
        """{"first": ..., "second": ...}: what each returned; an exception in either is raised."""
        results, errors = {}, []

        def call(name, fn):
            try:
                results[name] = fn()
            except Exception as e:  # noqa: BLE001 - raised below, in the test's thread
                errors.append(e)
            finally:
                if name == "second":
                    self.second_done.set()

        threads = {name: threading.Thread(target=call, args=(name, fn)) for name, fn in
                   (("first", first), ("second", second))}
        threads["first"].start()
        assert self.started.wait(60), "the first run never reached the held call"
        threads["second"].start()
        for thread in threads.values():
            thread.join(120)
        if errors:
            raise errors[0]
        return results


def test_two_generate_runs_at_once_keep_both_videos_and_prompts(tiny_pipeline_flax, tmp_path, monkeypatch):
    """"a cat!" and "a cat?" map to one name; the first run is held while writing its video."""
    config = tiny_config(tiny_pipeline_flax)
    job = str(tmp_path)
    prompts.embed_prompts(config.pretrained, ["", config.sampling.negative_prompt, "a cat!", "a cat?"], job)
    shades = {"a cat!": -0.5, "a cat?": 0.5}
    monkeypatch.setattr(generate, "keyframe_videos",
                        lambda *args: [np.full((2, 8, 8, 3), shades[args[5][0]], np.float32)])
    race = Race(monkeypatch)
    race.hold(video_io, "save_video")
    results = race.run(lambda: generate.generate_prompts(config, job, ["a cat!"], allow_untuned=True),
                       lambda: generate.generate_prompts(config, job, ["a cat?"], allow_untuned=True))
    assert [os.path.basename(p) for p in results["first"]] == ["0_a_cat.gif", "0_a_cat.mp4"]
    assert [os.path.basename(p) for p in results["second"]] == ["0_a_cat-2.gif", "0_a_cat-2.mp4"]
    folder = os.path.join(job, "samples", "generate_0")
    with open(os.path.join(folder, generate.SAMPLES_INDEX), encoding="utf-8") as f:
        assert json.load(f) == {"0_a_cat.gif": "a cat!", "0_a_cat-2.gif": "a cat?"}
    for name, prompt in (("0_a_cat.gif", "a cat!"), ("0_a_cat-2.gif", "a cat?")):  # each file holds its own video
        pixels = video_io.read_frames(os.path.join(folder, name)).astype(np.float32) / 127.5 - 1
        np.testing.assert_allclose(pixels, shades[prompt], atol=0.01)


def test_two_runs_at_once_keep_every_prompt_embedding(tiny_pipeline_flax, tmp_path, monkeypatch):
    """The first run is held while encoding; the second writes the cache meanwhile."""
    race = Race(monkeypatch)
    race.hold(text_loading, "encode_prompts")
    race.run(lambda: prompts.embed_prompts(tiny_pipeline_flax, ["a red square is moving"], str(tmp_path)),
             lambda: prompts.embed_prompts(tiny_pipeline_flax, ["a blue square is moving"], str(tmp_path)))
    cached = np.load(tmp_path / prompts.CACHE_FILE)
    assert len(cached.files) == 2


def world_job(tmp_path):
    """A workdir with two `generate` steps; the older step's folder is the one touched last."""
    prompt = world.prompt_for("red", "square", "snow")
    clip = world.make_clip(0, 4, 16, 24, colour="red", shape="square", background="snow")
    video = str(tmp_path / "clip.gif")
    video_io.save_video(clip.video * 2 - 1, video)
    job = tmp_path / "job"
    for step in (10, 3):
        folder = job / "samples" / f"generate_{step}"
        folder.mkdir(parents=True)
        video_io.save_video(clip.video * 2 - 1, str(folder / "0_x.gif"))
        # one sample listed under two spellings of its name
        (folder / generate.SAMPLES_INDEX).write_text(json.dumps({"0_x.gif": prompt, "./0_x.gif": prompt}))
    frames = {"num_frames": 4, "stride": 1, "start": 0, "reverse": False}
    return ml_collections.ConfigDict({"prompt": prompt, "video": video, "data": frames}), str(job)


def test_evaluate_writes_beside_the_newest_step_and_counts_each_sample_once(tmp_path):
    config, job = world_job(tmp_path)
    result, folder = evaluate.evaluate_workdir(config, job)
    assert folder == os.path.join(job, "samples", "generate_10", evaluate.EVALUATION_DIR)
    assert result["summary"]["clips"] == 1
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(json.dumps(result))
    assert sorted(os.listdir(folder)) == ["0_side_by_side.gif", "metrics.json"]
    assert sorted(os.listdir(job)) == ["samples"]
    with pytest.raises(FileExistsError, match=re.escape(f"{folder} exists; pass --overwrite")):
        evaluate.evaluate_workdir(config, job)
    assert evaluate.evaluate_workdir(config, job, overwrite=True)[1] == folder


def test_world_pipeline_is_never_written_over_an_existing_folder(tmp_path):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="exists; pass --overwrite to replace it"):
        world_pretraining.write_pretrained_pipeline(str(tmp_path / "hub"))
    assert os.listdir(tmp_path) == ["hub"] and os.listdir(tmp_path / "hub") == ["mine.txt"]


def test_cli_tiny_pipeline_refuses_before_writing_either_folder(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "mine.txt").write_text("precious")
    result = subprocess.run([sys.executable, "-m", "vmc_jax.cli", "tiny-pipeline", str(tmp_path / "base"),
                             str(tmp_path / "stages")], capture_output=True, text=True, timeout=300, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"vmc-jax: error: {tmp_path / 'stages'} exists; pass --overwrite to "
                                          "replace it"]
    assert sorted(os.listdir(tmp_path)) == ["stages"] and os.listdir(tmp_path / "stages") == ["mine.txt"]


def test_a_killed_runs_temporary_folder_is_removed_next_time(tmp_path, caplog):
    stale = tmp_path / ".out.tmp0123abcd"  # as a SIGKILL during atomic_dir leaves it
    stale.mkdir()
    (stale / "model_index.json").write_text("{}")
    (tmp_path / ".out.tmpdir").mkdir()  # not of that pattern: kept
    with caplog.at_level(logging.WARNING), files.atomic_dir(str(tmp_path / "out")):
        pass
    assert sorted(os.listdir(tmp_path)) == [".out.tmpdir", "out"]
    assert f"removing {stale}, left by an interrupted run" in caplog.text
