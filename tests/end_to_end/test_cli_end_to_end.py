"""The README's main command end to end: make, convert, train, generate, export (as subprocesses)."""

import json
import os
import subprocess
import sys

import numpy as np
from helpers import FAST_COMPILE_ENV, REPO
from safetensors.numpy import load_file

from vmc_jax import video_io
from vmc_jax.hub.conversion import read_state_dict


def test_demo_script_runs_the_whole_flow(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "demo_tiny.sh"), str(out)],
                            capture_output=True, text=True, timeout=1200,
                            env={**os.environ, **FAST_COMPILE_ENV,  # this interpreter's vmc-jax first on PATH
                                 "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]})
    assert result.returncode == 0, result.stderr[-3000:]
    for noise in ("Unable to initialize backend", "PyTorch was not found", "os.fork()", "Traceback"):
        assert noise not in result.stderr, result.stderr[-3000:]  # a plain CPU run is quiet
    run = out / "run"

    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(set(r) == {"step", "loss", "lr", "grad_norm"} and np.isfinite(r["loss"]) for r in rows)

    for folder, name in (("step_4", "0_a_blue_square_is_moving"),
                         ("generate_4", "0_a_blue_square_is_moving_on_the_snow")):
        for ext in ("gif", "mp4"):
            frames = video_io.read_frames(str(run / "samples" / folder / f"{name}.{ext}"))
            assert frames.shape == (8, 40, 64, 3), (folder, ext, frames.shape)

    delta = load_file(str(run / "vmc_delta.safetensors"))
    pretrained = {k: v() for k, v in read_state_dict(
        str(out / "pipeline_hub" / "unet" / "diffusion_pytorch_model.safetensors")).items()}
    assert delta and all("temp_attentions" in k and k.split(".")[-2] in ("to_q", "to_k", "to_v") for k in delta)
    for name, value in delta.items():  # PyTorch names and layouts of the Show-1 UNet, values tuned
        assert value.shape == pretrained[name].shape, name
        assert not np.array_equal(value, pretrained[name]), name
