"""What the shipped moving-shapes world model does on its own: clips sampled from random noise for
random world prompts, judged by the evaluator (prompted colour, shape and background found; track
steadiness). This is the issue's bar for the pretrained model (>= 90% colour and shape).

    python benchmarks/world_samples.py --workdir workdirs/world_samples [--prompts 24] [--guidance 4]

``--pipeline DIR`` samples another hub-layout world pipeline (e.g. a pretraining run's ``W/pipeline``)
instead of the shipped one; ``--no-x0-clipping`` turns the scheduler's x0 clipping off.

About 1.5 minutes on a 2-core CPU for 24 prompts at 16x24.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vmc_jax import evaluation, world, world_pretraining  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="where the pipeline and prompt cache go")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every sample's reading to this JSON file")
    parser.add_argument("--pipeline", help="a hub-layout world pipeline (default: the shipped one, written to WORKDIR)")
    parser.add_argument("--no-x0-clipping", dest="x0_clipping", action="store_false")
    args = parser.parse_args(argv)
    pipeline = args.pipeline or os.path.join(args.workdir, "pipeline")
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
        if args.pipeline:
            raise SystemExit(f"--pipeline {args.pipeline}: no model_index.json there")
        world_pretraining.write_pretrained_pipeline(pipeline, overwrite=True)  # absent or incomplete
    rng = np.random.default_rng(123)
    prompts = [world.prompt_for(str(rng.choice(list(world.COLOURS))), str(rng.choice(world.SHAPES)),
                                str(rng.choice(list(world.BACKGROUNDS)))) for _ in range(args.prompts)]
    videos = world_pretraining.sample_world(pipeline, args.workdir, prompts, 8, 16, 24, seed=args.seed,
                                            steps=args.steps, guidance=args.guidance, x0_clipping=args.x0_clipping)
    result = evaluation.evaluate_samples(list(videos), prompts)
    print(f"{args.prompts} prompts, {args.steps} DDIM steps, guidance {args.guidance}, "
          f"x0 clipping {'on' if args.x0_clipping else 'off'}:")
    for name, value in result["summary"].items():
        print(f"  {name:16} {'-' if value is None else round(value, 3)}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), **result}, f, indent=2)


if __name__ == "__main__":
    main()
