"""A stage built abstractly: shapes only, nothing computed or compiled (config validation).

`jaxcl.config_validation` builds each pre-training stage of a config this way, so a value the
builder cannot use (regions that do not fit the decoder's feature map, say) is reported before
any data is loaded, by the builder itself rather than a second copy of its rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from jaxcl import methods as registry
from jaxcl.data import pipeline
from jaxcl.methods import parts
from jaxcl.train import recipes
from jaxcl.train.parallel import AXIS_NAME


def trace_stage(
    config: ml_collections.ConfigDict, stage: str, recipe: recipes.BatchRecipe, num_devices: int
) -> None:
    """Builds `stage` and runs its loss on one batch under `jax.eval_shape`: shapes only.

    Each device's views, network outputs and loss (the step's parts, `StageParts`) run under
    `jax.vmap` over a leading axis of `num_devices` named like the devices' axis
    (`AXIS_NAME`), on a global batch of `jax.ShapeDtypeStruct`s. The step's gradient
    and update are left out: they add no shape of their own and would double the time.
    """

    def build_and_run(batch):
        built = registry.build(
            config, stage, recipe=recipe, num_devices=num_devices, key=jax.random.key(0)
        )

        def device_loss(device_batch):
            views = built.views(device_batch, jax.random.key(1))
            return built.loss(built.outputs(built.state, views), device_batch)

        return jax.vmap(device_loss, axis_name=AXIS_NAME)(batch)

    jax.eval_shape(build_and_run, batch_shapes(config, recipe, num_devices))


def batch_shapes(
    config: ml_collections.ConfigDict, recipe: recipes.BatchRecipe, num_devices: int
) -> dict[str, jax.ShapeDtypeStruct]:
    """A global pre-training batch of `recipe` as shapes (`jaxcl.data.pipeline`'s layout):
    `image` (num_devices, B, S, S, 1) float32 and the ids (num_devices, B) int32, B per device."""
    per_device = recipe.images_per_step(config.data.n_partitions) // num_devices
    image = jax.eval_shape(lambda: parts.example_input(config))  # (1, S, S, 1)
    ids = jax.ShapeDtypeStruct((num_devices, per_device), jnp.int32)
    return {
        "image": jax.ShapeDtypeStruct((num_devices, per_device, *image.shape[1:]), image.dtype),
        **dict.fromkeys(pipeline.ID_FIELDS, ids),
    }
