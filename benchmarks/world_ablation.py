"""The paper's comparison on the moving-shapes world: how well each method carries an input clip's
motion to new prompts, on the shipped pretrained world model (``vmc-jax world-pipeline``).

For each seed and each motion, an input clip (random colour, shape and background) and two new
target prompts; then per method, the target clips and their metrics (vmc_jax.world_evaluation):

  random_noise       no tuning, sampled from random noise (what the model does on its own);
  inverted_noise     no tuning, sampled from the clip's DDIM-inverted noise;
  vmc_paper          VMC: temporal-attention q/k/v tuned with the paper's motion-distillation loss;
  vmc_official       ... with the released code's loss;
  vmc_l2             ... with the l2 residual loss;
  epsilon_subset     the same subset tuned with the plain denoising loss;
  all_weights        every UNet weight tuned with the paper's loss.

Tuned methods sample from the inverted noise of their own tuned model, as VMC does. Settings are
``configs/vmc.py:world``'s (200 steps, AdamW 5e-4, 25 DDIM steps, guidance 4). Reported: mean
centroid error in pixels (16x24 frames), appearance accuracy (colour, shape and background as
prompted), colour and background leakage; mean and spread (min-max) over seeds.

    python benchmarks/world_ablation.py --workdir workdirs/ablation [--seeds 0,1] [--json out.json]

About 40 minutes on a 2-core CPU with the defaults (one compile per method, reused across clips).
``--demo`` runs the README demo's case instead: the bundled clip and its four target prompts.
``--guidance`` and ``--no-x0-clipping`` change the sampling; another world model is compared by
converting its hub pipeline into ``WORKDIR/pipeline_flax`` first (``vmc-jax convert``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import vmc as vmc_config  # noqa: E402
from vmc_jax import prompts, training, world, world_evaluation  # noqa: E402
from vmc_jax.jobs import config as jobs_config, generate, world_pretraining  # noqa: E402
from vmc_jax.jobs.convert import convert  # noqa: E402

# method -> (loss, tuned subset); None: no tuning, with its starting noise.
METHODS = {
    "random_noise": None,
    "inverted_noise": None,
    "vmc_paper": ("paper", training.TEMPORAL_ATTENTION_QKV),
    "vmc_official": ("official", training.TEMPORAL_ATTENTION_QKV),
    "vmc_l2": ("l2", training.TEMPORAL_ATTENTION_QKV),
    "epsilon_subset": ("epsilon", training.TEMPORAL_ATTENTION_QKV),
    "all_weights": ("paper", training.EVERY_PARAMETER),
}
MOTIONS = ("zigzag", "circle", "bounce")
TARGETS_PER_CLIP = 2
REPORTED = ("motion_error_px", "appearance_ok", "colour_leak", "background_leak")


def case(seed: int, motion: str, config) -> tuple[np.ndarray, str, list[str]]:
    """The input clip ``(f, h, w, 3)`` in [-1, 1], its prompt, and target prompts of other colours,
    shapes and backgrounds, from ``seed`` and ``motion``."""
    rng = np.random.default_rng([seed, MOTIONS.index(motion)])
    d = config.data
    clip = world.make_clip(rng, d.num_frames, d.height, d.width, motion=motion)
    targets = []
    for _ in range(TARGETS_PER_CLIP):
        pick = lambda names, used: str(rng.choice([n for n in names if n != used]))  # noqa: E731
        targets.append(world.prompt_for(pick(list(world.COLOURS), clip.colour), pick(world.SHAPES, clip.shape),
                                        pick(list(world.BACKGROUNDS), clip.background)))
    return clip.video * 2 - 1, clip.prompt, targets


def tune(step_fn, optimizer, tuned, frozen, clip, text, steps: int, seed: int):
    """``steps`` VMC updates of ``tuned`` on ``clip``; returns the tuned subset."""
    state = training.TrainState.create(jax.tree.map(jnp.copy, tuned), optimizer, jax.random.PRNGKey(seed))
    clips = jnp.asarray(clip)[None]
    for _ in range(steps):
        state, _ = step_fn(state, frozen, clips, text)
    return state.tuned


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the world pipeline and prompt cache go")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--motions", default=",".join(MOTIONS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--demo", action="store_true", help="the README demo's clip and targets (one case)")
    parser.add_argument("--json", help="also write every clip's metrics to this JSON file")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default: the config's)")
    parser.add_argument("--no-x0-clipping", dest="x0_clipping", action="store_false")
    args = parser.parse_args(argv)
    seeds, motions, methods = [int(s) for s in args.seeds.split(",")], args.motions.split(","), args.methods.split(",")

    config = vmc_config.get_config("world")
    config.pretrained = os.path.join(args.workdir, "pipeline_flax")
    if args.guidance is not None:
        config.sampling.guidance = args.guidance
    if not os.path.isdir(config.pretrained):
        hub = world_pretraining.write_pretrained_pipeline(os.path.join(args.workdir, "pipeline_hub"), overwrite=True)
        convert(hub, config.pretrained)
    job = jobs_config.Job.from_config(config)
    model, params, scheduler = generate.load_keyframe_unet(job)
    if not args.x0_clipping:
        scheduler = dataclasses.replace(scheduler, thresholding=False, clip_sample=False)
    optimizer = training.make_optimizer(config.train.lr, weight_decay=config.train.weight_decay,
                                        clip_grad_norm=config.train.clip_grad_norm)
    steps = {m: training.make_train_step(model, scheduler, optimizer, METHODS[m][0]) for m in methods if METHODS[m]}
    if args.demo:
        seeds, motions = [config.seed], ["demo"]
        cases = [(config.seed, "demo", generate.training_clip(config), config.prompt, list(vmc_config.WORLD_TARGETS))]
    else:
        cases = [(seed, motion, *case(seed, motion, config)) for seed in seeds for motion in motions]
    all_prompts = {"", *(p for c in cases for p in [c[3], prompts.appearance_invariant(c[3]), *c[4]])}
    texts = prompts.embed_prompts(config.pretrained, sorted(all_prompts), args.workdir)

    rows = []
    start = time.perf_counter()
    for seed, motion, clip, prompt, targets in cases:
        for method in methods:
            if METHODS[method] is None:
                tuned_params = params
            else:
                tuned, frozen = training.split_params(params, METHODS[method][1])
                text = jnp.asarray(texts[prompts.appearance_invariant(prompt)])[None]
                tuned_params = training.merge_params(
                    tune(steps[method], optimizer, tuned, frozen, clip, text, config.train.steps, seed), frozen)
            start_from = dataclasses.replace(job.sampling, init="random" if method == "random_noise" else "inverted")
            videos = generate.keyframe_videos(model, tuned_params, scheduler, clip, texts, targets, job.inversion,
                                              start_from, seed)
            result = world_evaluation.evaluate_world_clips([(clip + 1) / 2] * len(targets), [prompt] * len(targets),
                                                     [(np.asarray(v) + 1) / 2 for v in videos], targets)
            rows.append({"seed": seed, "motion": motion, "method": method, **result["summary"],
                         "clips": result["clips"]})
            print(f"[{time.perf_counter() - start:6.0f} s] seed {seed} {motion:7} {method:15} "
                  + " ".join(f"{k} {result['summary'][k]}" for k in REPORTED), flush=True)

    print(f"\n{len(seeds)} seeds x {len(motions)} motions x {len(cases[0][4])} target prompts; per method the "
          "mean over seeds, and [min, max] of the per-seed means")
    print(f"{'method':15} " + " ".join(f"{k:>26}" for k in REPORTED))
    for method in methods:
        cells = []
        for key in REPORTED:
            per_seed = []
            for seed in seeds:
                values = [r[key] for r in rows if r["method"] == method and r["seed"] == seed and r[key] is not None]
                if values:
                    per_seed.append(float(np.mean(values)))
            cells.append(f"{np.mean(per_seed):.2f} [{min(per_seed):.2f}, {max(per_seed):.2f}]" if per_seed else "-")
        print(f"{method:15} " + " ".join(f"{c:>26}" for c in cells))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
