"""Mixup against independent computations: the mixing, the λ distribution, the soft Dice."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from configs import synthetic
from jaxcl import config_validation, methods
from jaxcl.losses import segmentation
from jaxcl.methods import mixup


def test_mixing_is_the_convex_combination_with_the_partner():
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(6, 4, 4, 1)).astype(np.float32)
    targets = jax.nn.one_hot(rng.integers(0, 3, (6, 4, 4)), 3)
    mixed_images, mixed_targets, weights, partners = mixup.mix(
        jax.random.key(0), jnp.asarray(images), targets, alpha=0.1
    )
    weights, partners = np.asarray(weights), np.asarray(partners)
    assert sorted(partners.tolist()) == list(range(6))  # a permutation of the batch
    for i, (w, j) in enumerate(zip(weights, partners, strict=True)):
        np.testing.assert_allclose(mixed_images[i], w * images[i] + (1 - w) * images[j], atol=1e-6)
        np.testing.assert_allclose(
            mixed_targets[i], w * targets[i] + (1 - w) * targets[j], atol=1e-6
        )
    np.testing.assert_allclose(np.asarray(mixed_targets).sum(-1), 1.0, atol=1e-6)


def test_lambda_follows_beta_alpha_alpha():
    """λ ~ Beta(0.1, 0.1): a chi-square test of 4000 draws over bins from 0 to 1.

    Bins, not a Kolmogorov-Smirnov test: about 10% of Beta(0.1, 0.1) lies within float32's
    spacing of 1 and rounds to 1.0, a tie KS would count against the sampler.
    """
    keys = jax.random.split(jax.random.key(1), 100)
    images, targets = jnp.zeros((40, 1, 1, 1)), jnp.zeros((40, 1, 1, 2))
    weights = np.concatenate(
        [np.asarray(mixup.mix(key, images, targets, alpha=0.1)[2]) for key in keys]
    )
    edges = np.array([0.0, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 0.99, 1.0])
    observed, _ = np.histogram(weights, edges)
    expected = np.diff(scipy.stats.beta(0.1, 0.1).cdf(edges)) * weights.size
    assert scipy.stats.chisquare(observed, expected).pvalue > 0.001
    assert np.mean((weights < 0.05) | (weights > 0.95)) > 0.7  # mostly near 0 or 1


def test_soft_target_dice_equals_the_label_dice_on_one_hot_targets():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, (2, 5, 5)))
    np.testing.assert_allclose(
        segmentation.soft_target_dice_loss(logits, jax.nn.one_hot(labels, 3)),
        segmentation.soft_dice_loss(logits, labels, num_classes=3),
        rtol=1e-6,
    )
    # A hand case: targets 0.5 / 0.5 everywhere, uniform predictions -> Dice 0.5 per class.
    uniform = jnp.zeros((1, 2, 2, 2))
    half = jnp.full((1, 2, 2, 2), 0.5)
    np.testing.assert_allclose(segmentation.soft_target_dice_loss(uniform, half), 0.5, rtol=1e-6)


def test_fine_tuning_methods_in_the_config():
    config = synthetic.get_config("quick")
    config.finetune.method = "mixup"
    config_validation.validate(config, num_devices=1)
    config.finetune.method = "cutmix"
    config.finetune.mixup_alpha = 0.0
    problems = "\n".join(_problems(config))
    assert (
        "config.finetune.method='cutmix' is not one of ('supervised', 'mixup', 'self-training', "
        in problems
    )
    config.finetune.method = "mixup"
    assert "config.finetune.mixup_alpha=0.0: must be positive" in "\n".join(_problems(config))
    assert methods.fine_tuning("supervised").settings == ()


def _problems(config):
    try:
        config_validation.validate(config, num_devices=1)
    except config_validation.ConfigError as error:
        return error.problems
    return ()
