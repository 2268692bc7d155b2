"""Pretraining a small Show-1-style keyframe model on the moving-shapes world, from a seed.

``pretrain(config, workdir)`` (config: ``configs/world.py``) writes a hub-layout pipeline into
``workdir/pipeline`` (the Show-1 base layout of :mod:`vmc_jax.hub.tiny_pipeline`, with the world's
words in the tokenizer), trains every UNet parameter with the plain denoising MSE through the same
train step as VMC, on fresh world clips each step, and writes the EMA of the weights back into
``pipeline/unet`` so that ``vmc-jax convert`` and ``load_unet`` read the result. The model predicts
``config.model.prediction_type`` (the shipped one: epsilon, as Show-1's keyframe model; README's
"The moving-shapes world" says what a v-prediction run changed). The T5 encoder stays as drawn
(frozen, as Show-1 and IF keep theirs): its states differ per word, and the UNet's text
projection learns to read them. A killed run started again
resumes from its last checkpoint.

    vmc-jax world-pretrain --config configs/world.py:16x24 --workdir workdirs/world
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vmc_jax import files, keyframe_sampling, prompts, schedulers, training, world
from vmc_jax.hub import tiny_pipeline
from vmc_jax.hub.unet_loading import load_unet, to_torch_state_dict
from vmc_jax.jobs import checkpoints, loop, preemption

PIPELINE = "pipeline"
METRICS_FILE = "pretrain_metrics.jsonl"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Only the prediction is trained, so samplers must not read the (untrained) variance channels; DDIM,
# so that sampling from inverted noise is deterministic (per-frame ancestral noise at 25 steps makes
# this small model's backgrounds flicker). The prediction type is the model's (config.model).
SCHEDULER_CONFIG = {**tiny_pipeline.SCHEDULER_CONFIG, "_class_name": "DDIMScheduler", "variance_type": "fixed_small"}
# ``model.zero_terminal_snr``: the betas rescaled so that the last timestep keeps no signal, sampled from
# it ("trailing" timesteps), as Lin et al. 2024 prescribe: at t = T only the prompt can tell a frame's
# colour, where with Show-1's linear betas the noise still carries it (issue 24). Needs v prediction.
ZERO_TERMINAL_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
# The model trained by `vmc-jax world-pretrain` (configs/world.py:16x24 and the
# overrides in README's "The moving-shapes world"), shipped as fp16, with its seed, widths and
# prediction type.
PRETRAINED_UNET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world_unet.fp16.safetensors")
PRETRAINED_SEED = 0
PRETRAINED_MODEL = {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": 16,
                    "norm_num_groups": 32, "prediction_type": "epsilon", "zero_terminal_snr": False}
# Fewest channels a GroupNorm group may have in a model pretrained here: with one channel a group,
# ``conv_norm_out`` (no residual around it) is a per-frame instance norm, and the UNet cannot output a
# frame's mean colour, which is what the prompt says at high noise (issue 24).
MIN_CHANNELS_PER_GROUP = 4
EXPORT_DTYPES = {"float16": np.float16, "float32": np.float32}


def world_unet_config(model: ml_collections.ConfigDict) -> dict[str, Any]:
    """The tiny pipeline's Show-1 UNet config with ``model``'s widths: a ResNet level, then cross-attention levels."""
    levels = len(model.block_out_channels)
    if levels < 2:
        raise ValueError(f"model.block_out_channels {list(model.block_out_channels)}: need at least 2 levels")
    return {
        **tiny_pipeline.UNET_CONFIG,
        "block_out_channels": list(model.block_out_channels),
        "layers_per_block": model.layers_per_block,
        "attention_head_dim": model.attention_head_dim,
        "norm_num_groups": model.norm_num_groups,
        "down_block_types": ["ResnetDownsampleBlock3D"] + ["SimpleCrossAttnDownBlock3D"] * (levels - 1),
        "up_block_types": ["SimpleCrossAttnUpBlock3D"] * (levels - 1) + ["ResnetUpsampleBlock3D"],
    }


@jax.jit
def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """The EMA of the weights after ``step``: its decay warms up as (1 + step) / (10 + step) to ``decay``,
    so that the random start fades fast."""
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), ema, params)


def batch_for_step(config: ml_collections.ConfigDict, step: int,
                   prompt_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(clips (b, f, h, w, 3) in [-1, 1], prompt indices (b,)) of ``step``: a function of the seed and
    the step alone, so a resumed run sees the same data. Some prompts become "" (unconditional)."""
    rng = np.random.default_rng([config.seed, step])
    d = config.data
    clips, texts = world.make_batch(rng, config.train.batch_size, d.num_frames, d.height, d.width)
    ids = np.array([prompt_index[t] for t in texts])
    dropped = rng.random(len(ids)) < config.train.unconditional_fraction
    return clips.astype(np.float32), np.where(dropped, prompt_index[""], ids)


def make_pipeline(config: ml_collections.ConfigDict, folder: str) -> None:
    """Writes the untrained hub-layout pipeline (random UNet and T5, world tokenizer, DDIM scheduler of
    ``config.model.prediction_type`` and ``zero_terminal_snr``)."""
    tiny_pipeline.make_tiny_pipeline(folder, config.seed, unet_config=world_unet_config(config.model),
                                     prompts=world.all_prompts())
    scheduler = {**SCHEDULER_CONFIG, "prediction_type": config.model.prediction_type,
                 **(ZERO_TERMINAL_SNR if config.model.zero_terminal_snr else {})}
    files.write_text_atomic(os.path.join(folder, "scheduler", "scheduler_config.json"),
                            json.dumps(scheduler, indent=2, sort_keys=True))


def install_unet(folder: str, weights: str, model: ml_collections.ConfigDict) -> None:
    """Replaces the UNet weights of the pipeline ``folder`` (made for ``model``) by the hub-layout file
    ``weights``, after checking that it holds the same tensor names and shapes."""
    from safetensors.numpy import load_file

    path = os.path.join(folder, "unet", UNET_WEIGHTS)
    drawn = {k: v.shape for k, v in load_file(path).items()}  # the names and shapes the config gives
    given = load_file(weights)
    mismatched = sorted(k for k in drawn.keys() | given.keys()
                        if k not in drawn or k not in given or given[k].shape != drawn[k])
    if mismatched:
        raise ValueError(f"{weights} does not fit config.model {model.to_dict()}: "
                         f"{len(mismatched)} tensors differ (first: {mismatched[0]})")
    files.write_safetensors(path, given, metadata={"format": "pt"})


def write_pretrained_pipeline(folder: str, overwrite: bool = False) -> str:
    """Writes the shipped pretrained world pipeline (hub layout) as ``folder``: the T5 and tokenizer
    drawn from its seed, and the shipped UNet; returns ``folder``. Built beside it and renamed when
    complete; an existing ``folder`` is replaced only if ``overwrite``."""
    config = ml_collections.ConfigDict({"seed": PRETRAINED_SEED, "model": PRETRAINED_MODEL})
    with files.atomic_dir(folder, overwrite) as tmp:
        make_pipeline(config, tmp)
        install_unet(tmp, PRETRAINED_UNET, config.model)
    return folder


def check_group_norms(model: ml_collections.ConfigDict) -> None:
    """Refuses widths and ``norm_num_groups`` whose GroupNorms have fewer than ``MIN_CHANNELS_PER_GROUP``
    channels a group (or do not divide)."""
    for channels in model.block_out_channels:
        if channels % model.norm_num_groups or channels // model.norm_num_groups < MIN_CHANNELS_PER_GROUP:
            raise ValueError(
                f"model.norm_num_groups={model.norm_num_groups} with model.block_out_channels="
                f"{list(model.block_out_channels)}: a GroupNorm over {channels} channels needs groups of "
                f">= {MIN_CHANNELS_PER_GROUP} channels (with one a group the UNet cannot output a frame's mean colour); "
                f"use norm_num_groups <= {max(1, channels // MIN_CHANNELS_PER_GROUP)} dividing every width")


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Trains (or resumes training) the world model in ``workdir``; returns the pipeline folder.

    SIGTERM or SIGINT stops it after a step with a checkpoint (:class:`vmc_jax.errors.TrainingStopped`).
    """
    with preemption.StopOnSignal() as signals:
        return _pretrain(config, workdir, signals)


def _pretrain(config: ml_collections.ConfigDict, workdir: str, signals: preemption.StopOnSignal) -> str:
    t = config.train
    check_group_norms(config.model)
    if config.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype {config.export_dtype!r}: expected one of {sorted(EXPORT_DTYPES)}")
    if config.model.prediction_type not in schedulers.PREDICTION_TYPES:
        raise ValueError(f"model.prediction_type {config.model.prediction_type!r}: "
                         f"expected one of {schedulers.PREDICTION_TYPES}")
    if config.model.zero_terminal_snr and config.model.prediction_type != "v_prediction":
        raise ValueError(f"model.zero_terminal_snr with model.prediction_type={config.model.prediction_type!r}: "
                         "at the last timestep x_t holds no signal to read an epsilon off; use v_prediction")
    pipeline = os.path.join(workdir, PIPELINE)
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
        partial = pipeline + ".partial"  # complete or absent: a killed start is made again
        shutil.rmtree(partial, ignore_errors=True)
        make_pipeline(config, partial)
        if t.init_from:
            install_unet(partial, t.init_from, config.model)
        shutil.rmtree(pipeline, ignore_errors=True)
        os.replace(partial, pipeline)
    model, params = load_unet(os.path.join(pipeline, "unet"), dtype=np.float32, remat=t.remat)
    scheduler = schedulers.from_config(os.path.join(pipeline, "scheduler"))
    names = world.all_prompts() + [""]
    embeddings = prompts.embed_prompts(pipeline, names, workdir)
    table = jnp.asarray(np.stack([embeddings[n] for n in names]))
    prompt_index = {n: i for i, n in enumerate(names)}

    optimizer = training.make_optimizer(training.lr_schedule(t.lr, t.lr_schedule, t.steps, t.warmup_steps),
                                        weight_decay=t.weight_decay, clip_grad_norm=t.clip_grad_norm)
    tuned, frozen = training.split_params(params, training.EVERY_PARAMETER)

    def fresh_run(tuned: Any) -> dict[str, Any]:
        return {"state": training.TrainState.create(tuned, optimizer, jax.random.PRNGKey(config.seed)),
                "ema": jax.tree.map(jnp.copy, tuned)}

    store = checkpoints.TrainCheckpoints(os.path.join(workdir, "checkpoints"))
    resumed, run = store.restore_latest(jax.eval_shape(fresh_run, tuned))
    if resumed is not None:
        logging.info("resumed from step %d", resumed)
    else:
        run = jax.jit(fresh_run)(tuned)  # one compilation, not one per optimizer-state shape
    step_fn = training.make_train_step(model, scheduler, optimizer, loss_kind="epsilon")

    def step(run: dict[str, Any], i: int) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        clips, ids = batch_for_step(config, i, prompt_index)
        state, metrics = step_fn(run["state"], frozen, clips, table[ids])
        return {"state": state, "ema": ema_update(run["ema"], state.tuned, state.step, t.ema_decay)}, metrics

    metrics = loop.MetricsFiles([os.path.join(workdir, METRICS_FILE)], _metric_rows)
    run = loop.run(loop.Settings.from_config(t, "world pretraining"), step, run, resumed or 0, store, metrics,
                   signals, workdir)
    export_unet(model, run["ema"], os.path.join(pipeline, "unet"), EXPORT_DTYPES[config.export_dtype])
    return pipeline


def sample_world(pipeline: str, workdir: str, prompt_list: Sequence[str], num_frames: int, height: int, width: int,
                 seed: int = 0, steps: int = 25, guidance: float = 4.0, x0_clipping: bool = True,
                 guidance_rescale: float = 0.0) -> np.ndarray:
    """Clips ``(n, f, h, w, 3)`` in [0, 1] sampled from noise for each prompt by DDIM (the pipeline's
    scheduler settings; ``x0_clipping=False`` turns its x0 clipping and thresholding off) and
    classifier-free guidance (``guidance_rescale`` as in `sampling.classifier_free_guidance`); prompt
    states are cached in ``workdir``."""
    model, params = load_unet(os.path.join(pipeline, "unet"), dtype=np.float32)
    no_clipping = {} if x0_clipping else {"thresholding": False, "clip_sample": False}
    scheduler = schedulers.from_config(pipeline, _class_name="DDIMScheduler", **no_clipping)
    texts = prompts.embed_prompts(pipeline, [*prompt_list, ""], workdir)
    x_T = jax.random.normal(jax.random.PRNGKey(seed), (len(prompt_list), num_frames, height, width, 3))
    frames = keyframe_sampling.sample_keyframes(model, params, scheduler, x_T, jnp.stack([texts[p] for p in prompt_list]),
                                       jnp.asarray(texts[""])[None], steps, guidance, jax.random.PRNGKey(seed + 1),
                                       guidance_rescale=guidance_rescale)
    return (np.asarray(frames, np.float32) + 1) / 2


def frame_mean_error(model: Any, params: Any, scheduler: schedulers.Scheduler, clips: jax.Array, texts: jax.Array,
                     timestep: int, key: jax.Array) -> tuple[float, float]:
    """(mean square of the per-frame, per-channel mean of the model's x0 error, the same of a prompt-blind
    guess: the clips' frame means around their average) at ``timestep`` on ``clips`` (b, f, h, w, 3) in
    [-1, 1] with their prompt states ``texts``.

    At high noise x_t hardly tells a frame's mean colour (at a zero-SNR t = T not at all), so a model
    that does not read it from the prompt keeps about the second; one that does gets well below it.
    Measured on x0 rather than the noise: for a v-prediction model near t = T the noise is x_t, and its
    error says nothing.
    """
    noise = jax.random.normal(key, clips.shape, clips.dtype)
    t = jnp.full((clips.shape[0],), timestep)
    x_t = schedulers.add_noise(scheduler, clips, noise, t)
    out = model.apply({"params": params}, x_t, t, texts)[..., :clips.shape[-1]]
    means = clips.mean(axis=(2, 3))
    error = schedulers.predicted_sample(scheduler, out, x_t, t).mean(axis=(2, 3)) - means
    return float(jnp.mean(error ** 2)), float(jnp.mean((means - means.mean(axis=(0, 1))) ** 2))


def export_unet(model: Any, params: Any, folder: str, dtype: Any) -> str:
    """Writes ``params`` under their PyTorch names as the folder's ``diffusion_pytorch_model.safetensors``."""
    state_dict = {name: value.astype(dtype) for name, value in to_torch_state_dict(model, params).items()}
    return files.write_safetensors(os.path.join(folder, UNET_WEIGHTS), state_dict, metadata={"format": "pt"})


def _metric_rows(fetched: loop.Fetched, seconds_per_step: float) -> list[list[dict[str, float]]]:
    """The loss log's row of the fetched steps: their mean loss and seconds a step (from the second step on)."""
    loss = float(np.mean([per_clip[0]["loss"] for _, per_clip in fetched]))
    return [[{"step": fetched[-1][0], "loss": loss, "seconds_per_step": seconds_per_step}]]
