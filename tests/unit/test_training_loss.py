"""The motion-distillation losses against plain numpy statements of their formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from vmc_jax import schedulers, training
from vmc_jax.training import motion_distillation_loss


def numpy_losses(pred, true):
    """The paper's and the released code's formulas, channels last (b, f, h, w, c), written out loop by loop."""
    dp, dt = np.diff(pred, axis=1), np.diff(true, axis=1)
    b, f = dp.shape[:2]
    paper = np.mean([
        1 - np.dot(dp[i, j].ravel(), dt[i, j].ravel()) / (np.linalg.norm(dp[i, j]) * np.linalg.norm(dt[i, j]))
        for i in range(b) for j in range(f)
    ])
    ap, at = np.abs(dp), np.abs(dt)  # released: |residuals|, cosine along the frame axis
    official = np.mean(1 - (ap * at).sum(1) / (np.linalg.norm(ap, axis=1) * np.linalg.norm(at, axis=1)))
    l2 = np.mean((dp - dt) ** 2)
    return {"paper": paper, "official": official, "l2": l2}


@pytest.mark.parametrize("kind", ["paper", "official", "l2"])
def test_loss_matches_numpy(kind):
    rng = np.random.default_rng(0)
    true = rng.normal(size=(2, 8, 5, 7, 3)).astype(np.float32)
    pred = (0.7 * true + 0.5 * rng.normal(size=true.shape)).astype(np.float32)
    expected = numpy_losses(pred.astype(np.float64), true.astype(np.float64))[kind]
    np.testing.assert_allclose(float(motion_distillation_loss(pred, true, kind)), expected, rtol=1e-5)


def test_losses_vanish_for_the_true_noise_and_ignore_a_static_offset():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(1, 6, 4, 4, 3)).astype(np.float32)
    for kind in ("paper", "official", "l2"):
        assert abs(float(motion_distillation_loss(true + 3.0, true, kind))) < 1e-6, kind


def test_bad_inputs_are_named():
    x = np.zeros((1, 4, 2, 2, 3), np.float32)
    with pytest.raises(ValueError, match="unknown motion distillation loss 'cosine'"):
        motion_distillation_loss(x, x, "cosine")
    with pytest.raises(ValueError, match=r"\(1, 4, 2, 2, 3\) and eps_true \(1, 3, 2, 2, 3\)"):
        motion_distillation_loss(x, x[:, :3], "paper")


@pytest.mark.parametrize("kind", training.LOSS_KINDS)
def test_zero_weight_padding_leaves_the_loss_unchanged(kind):
    """The batch policy of vmc_jax.parallel: padding copies weighted 0 do not change the loss."""
    rng = np.random.default_rng(5)
    pred, true = (jnp.asarray(rng.standard_normal((3, 4, 2, 3, 3), dtype=np.float32)) for _ in range(2))
    padded_pred, padded_true = (jnp.concatenate([a, a[-1:], a[-1:]]) for a in (pred, true))
    weights = jnp.array([1.0, 1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(training.motion_distillation_loss(padded_pred, padded_true, kind, weights),
                               training.motion_distillation_loss(pred, true, kind), rtol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_train_loss_reads_the_prediction_as_its_scheduler_says(prediction_type):
    """The train step's loss of a model that predicts its target exactly is 0 for every loss kind
    (<= 1e-5), and the epsilon loss of a perturbed prediction is the MSE of the perturbation: the
    prediction is compared with the noise or the velocity, as the scheduler says."""
    scheduler = schedulers.from_config({"_class_name": "DDIMScheduler", "prediction_type": prediction_type})
    rng = np.random.default_rng(3)
    x0, noise, shift = (rng.normal(size=(2, 4, 3, 5, 3)).astype(np.float32) for _ in range(3))
    t = np.array([40, 950])
    exact = schedulers.training_target(scheduler, x0, noise, t)
    for kind in training.TRAIN_LOSS_KINDS:
        assert float(training.diffusion_loss(scheduler, exact, x0, noise, t, kind)) <= 1e-5, kind
    loss = training.diffusion_loss(scheduler, exact + 0.1 * shift, x0, noise, t, "epsilon")
    assert float(loss) == pytest.approx(np.mean((0.1 * shift) ** 2), rel=1e-4)
    if prediction_type != "epsilon":  # the target is not the noise: taking the noise for it is a loss
        for kind in training.TRAIN_LOSS_KINDS:
            assert float(training.diffusion_loss(scheduler, noise, x0, noise, t, kind)) > 0.05, kind
