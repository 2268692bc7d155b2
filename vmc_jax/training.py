"""VMC fine-tuning: the tuned parameter subset, the motion-distillation loss, the train step."""

from __future__ import annotations

import re
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vmc_jax import schedulers
from vmc_jax.schedulers import Scheduler

# Every to_q / to_k / to_v of both attentions of every temporal transformer (the set VMC tunes).
TEMPORAL_ATTENTION_QKV = r"(^|/)temp_attentions_\d+/transformer_blocks_\d+/attn[12]/to_[qkv]/(kernel|bias)$"
# Every parameter (pretraining, and the ablation that tunes the whole UNet).
EVERY_PARAMETER = r"^"


def split_params(params: Any, pattern: str = TEMPORAL_ATTENTION_QKV) -> tuple[dict, dict]:
    """Splits params into (tuned, frozen) nested dicts: tuned are the leaves whose path matches.

    Paths are the '/'-joined Flax names, e.g. ``up_blocks_1/temp_attentions_0/.../attn1/to_q/kernel``.
    Taking gradients with respect to ``tuned`` alone keeps the frozen weights out of autodiff.
    """
    regex = re.compile(pattern)
    flat = traverse_util.flatten_dict(params)
    tuned = {k: v for k, v in flat.items() if regex.search("/".join(k))}
    if not tuned:
        raise ValueError(f"no parameter path matches {pattern!r}")
    frozen = {k: v for k, v in flat.items() if k not in tuned}
    return traverse_util.unflatten_dict(tuned), traverse_util.unflatten_dict(frozen)


def merge_params(tuned: Any, frozen: Any) -> dict:
    """The inverse of :func:`split_params`."""
    return traverse_util.unflatten_dict({**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(tuned)})


LOSS_KINDS = ("paper", "official", "l2")
# What the train step takes: the motion-distillation losses, and "epsilon", the plain denoising loss
# (pretraining, and the ablation that tunes VMC's subset with it): the MSE against the scheduler's
# target, the noise for an epsilon model (the name of Show-1's case), the velocity for a v model.
TRAIN_LOSS_KINDS = (*LOSS_KINDS, "epsilon")


def _cosine(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
    """Cosine similarity along ``axis``, each norm clamped at ``eps`` (as torch's cosine_similarity)."""
    norms = jnp.maximum(jnp.linalg.norm(a, axis=axis), eps) * jnp.maximum(jnp.linalg.norm(b, axis=axis), eps)
    return jnp.sum(a * b, axis=axis) / norms


def motion_distillation_loss(eps_pred: jax.Array, eps_true: jax.Array, kind: str = "paper",
                             weights: jax.Array | None = None) -> jax.Array:
    """VMC's loss on frame-to-frame residuals of predicted and true noise, ``(b, f, h, w, c)`` each.

    "paper": 1 - cosine between the residual vectors of consecutive frames (each flattened over
    h, w, c), averaged over frame pairs and batch; "official": the released code's form, 1 -
    cosine along the frame axis of the absolute residuals, averaged over b, h, w, c; "l2": mean
    squared difference of the residuals. ``weights`` ``(b,)`` weigh the batch mean (0 for the
    padding of a batch that does not divide its mesh axis, see `vmc_jax.parallel`).
    """
    if eps_pred.shape != eps_true.shape:
        raise ValueError(f"eps_pred {eps_pred.shape} and eps_true {eps_true.shape} differ in shape")
    pred = (eps_pred[:, 1:] - eps_pred[:, :-1]).astype(jnp.float32)
    true = (eps_true[:, 1:] - eps_true[:, :-1]).astype(jnp.float32)
    b, f = pred.shape[:2]
    if kind == "paper":
        terms = 1 - _cosine(pred.reshape(b, f, -1), true.reshape(b, f, -1), axis=-1)
    elif kind == "official":
        terms = 1 - _cosine(jnp.abs(pred), jnp.abs(true), axis=1)
    elif kind == "l2":
        terms = jnp.square(pred - true)
    else:
        raise ValueError(f"unknown motion distillation loss {kind!r}; expected one of {LOSS_KINDS}")
    return _batch_mean(terms, weights)


def diffusion_loss(scheduler: Scheduler, prediction: jax.Array, x0: jax.Array, noise: jax.Array,
                   t: jax.Array, kind: str, weights: jax.Array | None = None) -> jax.Array:
    """The train step's loss of the model's ``prediction`` at x_t = `schedulers.add_noise` (x0, noise, t),
    against the scheduler's target (`schedulers.training_target`: the noise for Show-1's epsilon models).

    "epsilon": the mean squared error; any other ``kind``: a :func:`motion_distillation_loss` of the
    two. A v model is distilled on its velocities, not on the noise they imply: near pure noise that
    is x_t's own noise whatever the model predicts, which leaves a loss on it almost no gradient.
    ``weights`` as there.
    """
    target = schedulers.training_target(scheduler, x0, noise, t)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    if kind != "epsilon":
        return motion_distillation_loss(prediction, target, kind, weights)
    return _batch_mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)), weights)


def _batch_mean(terms: jax.Array, weights: jax.Array | None) -> jax.Array:
    """The mean of ``terms`` (batch, ...), each item's mean weighed by ``weights`` (batch,) if given.

    Every item has as many terms, so without weights this is the plain mean of all of them.
    """
    per_item = jnp.mean(terms.reshape(terms.shape[0], -1), axis=1)
    if weights is None:
        return jnp.mean(per_item)
    return jnp.sum(weights * per_item) / jnp.sum(weights)


def lr_schedule(lr: float, schedule: str, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """The learning rate per step: "constant", "linear" or "cosine" decay, after a linear warmup."""
    decays = {
        "constant": lambda: optax.constant_schedule(lr),
        "linear": lambda: optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1)),
        "cosine": lambda: optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1)),
    }
    if schedule not in decays:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {sorted(decays)}")
    if not warmup_steps:
        return decays[schedule]()
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decays[schedule]()], [warmup_steps])


def make_optimizer(lr: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   weight_decay: float = 1e-2, clip_grad_norm: float = 1.0,
                   decay_mask: Any = None) -> optax.GradientTransformation:
    """Gradient-norm clipping, then AdamW, as the released VMC trains.

    It is applied to the tuned subset alone (gradients are only taken for it), so its state
    and the weight decay touch nothing else; ``decay_mask`` narrows the decay further
    (``optax.masked`` semantics: a pytree of bools or a function of the params).
    """
    return optax.chain(
        optax.clip_by_global_norm(clip_grad_norm),
        optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs: the step, the tuned params, the optimizer state, the rng."""

    step: jax.Array
    tuned: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, tuned: Any, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(jnp.zeros((), jnp.int32), tuned, optimizer.init(tuned), rng)


def make_train_step(model: nn.Module, scheduler: Scheduler, optimizer: optax.GradientTransformation,
                    loss_kind: str = "paper", per_clip: bool = False) -> Callable:
    """A jitted ``(state, frozen, clips, text, weights=None) -> (state, metrics)`` update with a :func:`diffusion_loss`.

    ``clips`` ``(b, f, h, w, c)`` in [-1, 1]; ``text`` ``(b or 1, L, d)``; ``weights`` ``(b,)``
    weigh the loss (0 for batch padding). Per clip a timestep t ~ U{0..T-1} and noise ~ N(0, I)
    give x_t; the model runs in train mode (temporal-conv dropout); the loss compares the first
    ``c`` output channels with the scheduler's target. A step whose loss or gradients are not finite changes
    no parameter and reports ``finite=False``. The state is donated, so its buffers are updated
    in place. ``per_clip``: several independent problems at once (see :func:`init_per_clip`):
    state, clips, text and weights carry a leading clip axis, the frozen weights are shared.
    """
    if loss_kind not in TRAIN_LOSS_KINDS:
        raise ValueError(f"unknown loss {loss_kind!r}; expected one of {TRAIN_LOSS_KINDS}")
    alphas = scheduler.alphas_cumprod

    def step(state: TrainState, frozen: Any, clips: jax.Array, text: jax.Array, weights: jax.Array | None = None):
        rng, t_key, noise_key, dropout_key = jax.random.split(state.rng, 4)
        batch, channels = clips.shape[0], clips.shape[-1]
        t = jax.random.randint(t_key, (batch,), 0, len(alphas))
        noise = jax.random.normal(noise_key, clips.shape, jnp.float32)
        noisy = schedulers.add_noise(scheduler, clips, noise, t)
        text = jnp.broadcast_to(text, (batch, *text.shape[1:]))

        def loss_fn(tuned):
            out = model.apply({"params": merge_params(tuned, frozen)}, noisy, t, text, train=True,
                              rngs={"dropout": dropout_key})
            return diffusion_loss(scheduler, out[..., :channels], clips, noise, t, loss_kind, weights)

        loss, grads = jax.value_and_grad(loss_fn)(state.tuned)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.tuned)
        tuned = optax.apply_updates(state.tuned, updates)
        # a non-finite step leaves params and optimizer state as they were (the loop decides what then)
        tuned, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                        (tuned, opt_state), (state.tuned, state.opt_state))
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
        return TrainState(state.step + 1, tuned, opt_state, rng), metrics

    if not per_clip:
        return jax.jit(step, donate_argnums=0)

    def per_clip_step(state: TrainState, frozen: Any, clips: jax.Array, text: jax.Array,
                      weights: jax.Array | None = None):
        return jax.vmap(step, in_axes=(0, None, 0, 0, 0))(state, frozen, clips, text, weights)

    return jax.jit(per_clip_step, donate_argnums=0)


def init_per_clip(tuned: Any, optimizer: optax.GradientTransformation, rngs: jax.Array) -> TrainState:
    """One train state per clip, stacked on a leading axis, all from the same tuned start."""
    return jax.vmap(lambda rng: TrainState.create(tuned, optimizer, rng))(rngs)
