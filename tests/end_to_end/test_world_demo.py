"""The shipped moving-shapes world model (issue 13): it loads through `vmc-jax world-pipeline` and
`convert`, and VMC carries the bundled clip's zigzag to new prompts far better than sampling the
same prompts from random noise."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from configs import vmc as vmc_config
from vmc_jax import keyframe_sampling, prompts, world_evaluation
from vmc_jax.jobs import evaluate, generate, world_pretraining
from vmc_jax.jobs.convert import convert
from vmc_jax.jobs.tune import train_and_evaluate

TARGETS = vmc_config.WORLD_TARGETS[:2]
# Mean centroid error of VMC (tuned, from the clip's inverted noise) over that of the untuned model
# from random noise, at most. Measured with the demo's settings (200 steps): 0.28 (1.95 px against
# 7.02 px over the four WORLD_TARGETS, `benchmarks/world_ablation.py --demo`); the issue asks for
# <= 1/3 on held-out motions.
MARGIN = 0.5


@pytest.fixture(scope="module")
def world_flax(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    hub = world_pretraining.write_pretrained_pipeline(str(root / "hub"))
    convert(hub, str(root / "flax"))
    return str(root / "flax")


def test_the_pipeline_carries_the_shipped_weights(tmp_path):
    hub = world_pretraining.write_pretrained_pipeline(str(tmp_path / "hub"))
    written = load_file(f"{hub}/unet/{world_pretraining.UNET_WEIGHTS}")
    shipped = load_file(world_pretraining.PRETRAINED_UNET)
    assert written.keys() == shipped.keys()
    assert all(np.array_equal(written[k], shipped[k]) for k in shipped)


def test_vmc_moves_new_objects_along_the_input_path(world_flax, tmp_path):
    """The README demo's flow (train, generate, evaluate) with fewer steps and prompts."""
    config = vmc_config.get_config("world")
    config.pretrained = world_flax
    config.validation.prompts = TARGETS
    config.train.steps = config.train.checkpoint_every = 100
    job = str(tmp_path / "run")
    train_and_evaluate(config, job)
    generate.generate_prompts(config, job, [])  # the config's prompts
    printed = subprocess.run([sys.executable, "-m", "vmc_jax.cli", "evaluate", "--workdir", job],
                             capture_output=True, text=True, check=True).stdout
    folder = os.path.join(job, "samples", "generate_100", evaluate.EVALUATION_DIR)
    with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as f:
        tuned = json.load(f)
    assert re.search(rf"^motion_error_px +{round(tuned['summary']['motion_error_px'], 3)}$", printed, re.MULTILINE)
    assert tuned["summary"]["found_fraction"] == 1.0  # an object in every frame, so the error is a distance
    assert {clip["target_prompt"] for clip in tuned["clips"]} == set(TARGETS)
    assert all(os.path.isfile(os.path.join(folder, clip["gif"])) for clip in tuned["clips"])

    model, params, scheduler = generate.load_keyframe_unet(config)
    texts = prompts.embed_prompts(config.pretrained, ["", *TARGETS], job)
    clip = generate.training_clip(config)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (len(TARGETS), *clip.shape))
    from_noise = keyframe_sampling.sample_keyframes(
        model, params, scheduler, x_T, jnp.stack([texts[p] for p in TARGETS]), jnp.asarray(texts[""])[None],
        config.sampling.steps, config.sampling.guidance, jax.random.PRNGKey(1))
    untuned = world_evaluation.evaluate_world_clips([(clip + 1) / 2] * len(TARGETS), [config.prompt] * len(TARGETS),
                                              [(np.asarray(v) + 1) / 2 for v in from_noise], TARGETS)
    assert untuned["summary"]["found_fraction"] == 1.0
    tuned_error, noise_error = tuned["summary"]["motion_error_px"], untuned["summary"]["motion_error_px"]
    assert tuned_error < MARGIN * noise_error, (tuned_error, noise_error)
