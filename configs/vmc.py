"""VMC motion customization of one clip with Show-1's keyframe model.

    vmc-jax train --config configs/vmc.py:car_forest --workdir workdirs/car_forest \\
        --config.pretrained=checkpoints/show-1-base --config.video=videos/car_forest

The argument picks one of the release's example clips (settings of the official configs), "all"
(the five tuned at once, ``config.clips``),
"world", the README's demo on the pretrained moving-shapes world model (``vmc-jax world-pipeline``),
or "tiny", the small random pipeline of the plumbing tests. Every field can be overridden with
``--config.<field>=<value>``.
"""

import ml_collections

from vmc_jax.jobs import config as jobs_config

# clip -> (training prompt, validation prompts), as in the released configs.
CLIPS = {
    "car_forest": ("a car is moving", [
        "a car is moving, underwater", "a car is moving, under the deep sea", "a tank is moving on the snow",
        "a lamborghini is moving in space", "a lamborghini is moving in desert"]),
    "bird_forest": ("a bird is flying", ["a Phoenix is flying above lava", "a majestic dragon is flying in forest"]),
    "bear": ("a brown bear is walking", ["a panda bear is walking", "a tiger is walking on the snow"]),
    "pills_black": ("pills are falling.", ["colorful confetti are falling", "gem stones are falling"]),
    "sharks_swimming": ("two sharks are moving", [
        "two spaceships are moving in space", "two goldfish are moving in the ocean"]),
}

# New appearances for the world demo's motion: other colours, shapes and backgrounds.
WORLD_TARGETS = ["a yellow disc is moving in the sea", "a purple triangle is moving on the grass",
                 "an orange square is moving in space", "a pink disc is moving in the desert"]


def get_config(arg: str = "car_forest") -> ml_collections.ConfigDict:
    """The config for clip ``arg`` (a key of CLIPS, or "tiny")."""
    if arg not in ("tiny", "world", "all") and arg not in CLIPS:
        raise ValueError(f"unknown clip {arg!r}; expected 'tiny', 'world', 'all' or one of {sorted(CLIPS)}")
    config = jobs_config.defaults()  # every field, its default and its meaning: vmc_jax/jobs/config.py
    config.video = f"videos/{arg}"
    config.prompt, validation_prompts = CLIPS.get(arg, ("a red square is moving", ["a blue square is moving"]))
    config.validation.prompts = validation_prompts
    # config.clips: several clips tuned at once ("all": the five release clips), each with its own tuned
    # weights and optimizer state, over the mesh's "clips" axis, in a one-clip job folder <workdir>/<name>.

    if arg == "tiny":
        config.pretrained = "workdirs/tiny/pipeline_flax"
        config.video = "configs/assets/moving_square.gif"
        config.train.steps = 4
        config.train.checkpoint_every = 2
        config.train.log_every = 2
        config.train.remat = False
        config.validation.every = 4
        config.inversion.steps = 4
        config.sampling.steps = 4
        config.cascade.update(dict(interpolation_steps=2, sr1_image_steps=2, sr1_steps=2, sr2_steps=2,
                                   sr2_height=32, sr2_width=64))
    if arg == "all":
        config.video = config.prompt = ""  # per clip, below
        config.validation.prompts = []
        for name, (prompt, targets) in CLIPS.items():
            config.clips[name] = ml_collections.ConfigDict(dict(video=f"videos/{name}", prompt=prompt,
                                                                validation_prompts=targets))
    if arg == "world":  # the bundled clip: a red square zigzagging down over snow (vmc_jax.world, seed 7)
        config.pretrained = "workdirs/world/pipeline_flax"
        config.video = "configs/assets/world_zigzag.gif"
        config.prompt = "a red square is moving on the snow"
        config.validation.prompts = WORLD_TARGETS
        config.validation.every = 0
        config.data.update(dict(height=16, width=24))
        config.train.update(dict(steps=200, lr=5e-4, checkpoint_every=100, log_every=50, remat=False))
        config.inversion.steps = 25
        config.sampling.update(dict(steps=25, guidance=4.0))
    return config
