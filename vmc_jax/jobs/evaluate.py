"""``vmc-jax evaluate``: a job's newest generated samples measured: the world evaluator on a world job,
the CLIP metrics on real videos."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from vmc_jax import clip_metrics, files, world
from vmc_jax.jobs import generate, workdir
from vmc_jax.world_evaluation import evaluate_files

EVALUATION_DIR = "evaluation"  # in the samples folder it measures


def evaluate_workdir(config: Any, job_dir: str, overwrite: bool = False) -> tuple[dict[str, Any], str]:
    """``vmc-jax evaluate``: :func:`evaluate_files` on the samples of ``job_dir``'s newest ``generate``
    step (each file its samples index lists, once, with its prompt) against the job's clip and
    prompt; returns (the result, the folder it is written to: ``evaluation/`` in that samples folder,
    made whole or not at all, and replaced only if ``overwrite``)."""
    samples_root = workdir.samples_dir(job_dir, "")
    steps = sorted(int(d[len("generate_"):]) for d in (os.listdir(samples_root) if os.path.isdir(samples_root) else ())
                   if re.fullmatch(r"generate_\d+", d))
    run_dir = os.path.join(samples_root, f"generate_{steps[-1]}") if steps else None
    index_path = os.path.join(run_dir, generate.SAMPLES_INDEX) if run_dir else None
    if index_path is None or not os.path.isfile(index_path):
        raise ValueError(f"no `vmc-jax generate` samples with a {generate.SAMPLES_INDEX} in {samples_root}: "
                         "run `vmc-jax generate --workdir ... --prompt ...` first")
    with open(index_path, encoding="utf-8") as f:
        listed = json.load(f)
    samples = {os.path.normpath(os.path.join(run_dir, name)): prompt for name, prompt in listed.items()}
    real = [p for p in [config.prompt, *samples.values()] if not world.is_world_prompt(p)]
    clip_model = config.evaluation.clip if "evaluation" in config else ""  # a config saved before the field
    if real and not clip_model:
        raise ValueError(f"{real[0]!r} is not a moving-shapes world prompt: `evaluate` measures motion and "
                         "appearance against the world's ground truth; for real videos give a CLIP model for the "
                         "CLIP metrics (text alignment, frame consistency): --config.evaluation.clip=<CLIPModel folder>")
    out_dir = os.path.join(run_dir, EVALUATION_DIR)
    with files.atomic_dir(out_dir, overwrite) as tmp:
        if real:
            return clip_metrics.evaluate_videos(clip_metrics.ClipScorer.load(clip_model), samples, tmp), out_dir
        d = config.data
        return evaluate_files(config.video, config.prompt, samples, tmp, d.num_frames, d.stride, d.start,
                              d.reverse), out_dir


