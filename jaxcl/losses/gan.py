"""The non-saturating GAN losses of the semi-supervised baselines (docs/METHOD.md §18, §19).

A discriminator's logits score "real" (target 1) against "fake" (target 0); the network it judges
is trained towards target 1 on its fakes (Goodfellow et al. 2014's non-saturating form).
"""

import jax
import jax.numpy as jnp
import optax


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Mean cross-entropy of the real logits against 1 plus that of the fakes against 0."""
    return (
        optax.sigmoid_binary_cross_entropy(real_logits, jnp.ones_like(real_logits)).mean()
        + optax.sigmoid_binary_cross_entropy(fake_logits, jnp.zeros_like(fake_logits)).mean()
    )


def non_saturating_loss(fake_logits: jax.Array) -> jax.Array:
    """The judged network's term: the fakes' mean cross-entropy against target 1."""
    return optax.sigmoid_binary_cross_entropy(fake_logits, jnp.ones_like(fake_logits)).mean()
