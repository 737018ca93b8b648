"""Tests of the masked NT-Xent kernel and the global strategies against a float64 numpy loop."""

import functools
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcl.losses import contrastive


def _load_reference():
    path = pathlib.Path(__file__).with_name("reference.py")
    spec = importlib.util.spec_from_file_location("losses_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

NUM_DEVICES = 8

# Jitted once per test module: eager op-by-op dispatch is much slower than one compile on CPU.
nt_xent = jax.jit(contrastive.nt_xent)
nt_xent_value_and_grad = jax.jit(jax.value_and_grad(contrastive.nt_xent))


def make_layout(strategy, rng, num_volumes=3, num_partitions=4, num_views=2, first_sample=0):
    """Random valid ids of a global-loss batch, views shuffled.

    GR: num_volumes * num_partitions random slices (random partitions), num_views views each.
    GD-/GD: num_volumes volumes x num_partitions partitions, one slice each, num_views views.
    """
    num_slices = num_volumes * num_partitions
    if strategy == "GR":
        slice_partitions = rng.integers(0, num_partitions, num_slices)
    else:
        slice_partitions = np.tile(np.arange(num_partitions), num_volumes)
    sample_ids = np.repeat(first_sample + np.arange(num_slices), num_views)
    partition_ids = np.repeat(slice_partitions, num_views)
    order = rng.permutation(len(sample_ids))
    return sample_ids[order].astype(np.int32), partition_ids[order].astype(np.int32)


def random_masks(rng, num):
    """Random disjoint (positive, negative) masks with empty diagonals, some empty rows."""
    draw = rng.integers(0, 3, (num, num))  # 0: neither, 1: positive, 2: negative
    np.fill_diagonal(draw, 0)
    draw[0] = np.where(draw[0] == 2, 0, draw[0])  # anchor 0 has no negatives
    return draw == 1, draw == 2


class NtXentTest(parameterized.TestCase):
    def test_hand_computed_three_embeddings(self):
        # z1 = (1, 0); z2 at 60° (norm 3, normalised to (1/2, √3/2)); z3 = (-1, 0); τ = 0.5.
        # Positives 1↔2, negatives 1↔3 and 2↔3 (so each pair has one negative):
        # s12 = cos60/0.5 = 1, s13 = -1/0.5 = -2, s23 = -cos60/0.5 = -1.
        # ℓ(1,2) = log(1 + e^(s13 - s12)) = log(1 + e^-3) = 0.0485873516
        # ℓ(2,1) = log(1 + e^(s23 - s21)) = log(1 + e^-2) = 0.1269280110
        # mean = 0.0877576813
        z = jnp.array([[1.0, 0.0], [1.5, 1.5 * np.sqrt(3.0)], [-1.0, 0.0]])
        positive = jnp.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
        negative = jnp.array([[0, 0, 1], [0, 0, 1], [0, 0, 0]], bool)
        loss = nt_xent(z, positive, negative, 0.5)
        np.testing.assert_allclose(loss, 0.0877576813, rtol=1e-6)

    def test_hand_computed_two_embeddings_without_negatives(self):
        # Two views of one sample and nothing to contrast with: ℓ = -log(e^s / e^s) = 0.
        z = jnp.array([[1.0, 2.0], [-3.0, 0.5]])
        positive, negative = contrastive.global_masks("GR", jnp.array([7, 7]), jnp.array([0, 0]))
        self.assertEqual(float(nt_xent(z, positive, negative, 0.1)), 0.0)

    @parameterized.parameters(0, 1, 2)
    def test_matches_reference_on_random_masks(self, seed):
        rng = np.random.default_rng(seed)
        z = rng.normal(size=(10, 6))
        positive, negative = random_masks(rng, 10)
        expected = reference.nt_xent(z, positive, negative, 0.1)
        loss = nt_xent(jnp.asarray(z, jnp.float32), positive, negative, 0.1)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    def test_identical_embeddings_give_known_value_and_finite_gradients(self):
        # All similarities equal 1/τ, so every pair gives ℓ = log(1 + #negatives of its anchor).
        z = jnp.ones((6, 4))
        sample_ids = jnp.array([0, 0, 1, 1, 2, 2])
        positive, negative = contrastive.global_masks("GR", sample_ids, jnp.zeros(6, int))
        loss, grad = nt_xent_value_and_grad(z, positive, negative, 0.1)
        np.testing.assert_allclose(loss, np.log(5.0), rtol=1e-6)
        self.assertTrue(np.all(np.isfinite(grad)))

    def test_zero_embeddings_are_finite(self):
        positive, negative = contrastive.global_masks("GR", jnp.array([0, 0, 1, 1]), jnp.zeros(4))
        loss, grad = nt_xent_value_and_grad(jnp.zeros((4, 3)), positive, negative, 0.1)
        np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)  # all s = 0: log(1 + 2)
        self.assertTrue(np.all(np.isfinite(grad)))

    def test_small_temperature_with_unit_vectors_does_not_overflow(self):
        rng = np.random.default_rng(3)
        z = reference.normalize(rng.normal(size=(12, 8)))
        sample_ids, partition_ids = make_layout("GR", rng, num_volumes=2, num_partitions=3)
        # Make one negative nearly identical to an anchor: its logit is ~ +100 at τ = 0.01.
        z[1] = z[0] + 1e-3
        expected = reference.global_loss(z, sample_ids, partition_ids, "GR", 0.01)
        loss_fn = functools.partial(contrastive.global_loss, strategy="GR", temperature=0.01)
        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(
            jnp.asarray(z, jnp.float32), sample_ids, partition_ids
        )
        self.assertTrue(np.all(np.isfinite(grad)))
        np.testing.assert_allclose(loss, expected, rtol=1e-4)

    def test_no_positive_pairs_gives_zero_with_zero_gradients(self):
        positive = jnp.zeros((4, 4), bool)
        negative = ~jnp.eye(4, dtype=bool)
        z = jax.random.normal(jax.random.key(0), (4, 3))
        loss, grad = nt_xent_value_and_grad(z, positive, negative, 0.1)
        self.assertEqual(float(loss), 0.0)
        np.testing.assert_array_equal(grad, np.zeros((4, 3)))

    def test_bfloat16_input_is_scored_in_float32(self):
        rng = np.random.default_rng(4)
        z = jnp.asarray(rng.normal(size=(8, 16)), jnp.bfloat16)
        positive, negative = random_masks(rng, 8)
        loss = nt_xent(z, positive, negative, 0.1)
        self.assertEqual(loss.dtype, jnp.float32)
        expected = reference.nt_xent(np.asarray(z, np.float64), positive, negative, 0.1)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)


class GlobalLossTest(chex.TestCase):
    @parameterized.product(strategy=("GR", "GD-", "GD"), seed=(0, 1))
    def test_masks_match_spec_table(self, strategy, seed):
        rng = np.random.default_rng(seed)
        sample_ids, partition_ids = make_layout(strategy, rng, num_views=3)
        positive, negative = contrastive.global_masks(strategy, sample_ids, partition_ids)
        expected_positive, expected_negative = reference.global_masks(
            strategy, sample_ids, partition_ids
        )
        np.testing.assert_array_equal(positive, expected_positive)
        np.testing.assert_array_equal(negative, expected_negative)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(strategy=("GR", "GD-", "GD"), temperature=(0.1, 0.5))
    def test_matches_reference(self, strategy, temperature):
        rng = np.random.default_rng(5)
        num_views = 3 if strategy == "GD-" else 2
        sample_ids, partition_ids = make_layout(strategy, rng, num_views=num_views)
        z = rng.normal(size=(len(sample_ids), 16))
        loss_fn = self.variant(
            functools.partial(contrastive.global_loss, strategy=strategy, temperature=temperature)
        )
        loss = loss_fn(jnp.asarray(z, jnp.float32), sample_ids, partition_ids)
        expected = reference.global_loss(z, sample_ids, partition_ids, strategy, temperature)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    @parameterized.parameters("GR", "GD-", "GD")
    def test_permuting_the_batch_with_its_ids_leaves_the_loss_unchanged(self, strategy):
        rng = np.random.default_rng(6)
        sample_ids, partition_ids = make_layout(strategy, rng)
        z = jnp.asarray(rng.normal(size=(len(sample_ids), 8)), jnp.float32)
        loss_fn = jax.jit(
            functools.partial(contrastive.global_loss, strategy=strategy, temperature=0.1)
        )
        order = rng.permutation(len(sample_ids))
        np.testing.assert_allclose(
            loss_fn(z[order], sample_ids[order], partition_ids[order]),
            loss_fn(z, sample_ids, partition_ids),
            rtol=1e-6,
        )

    def test_unknown_strategy_lists_valid_names(self):
        with self.assertRaisesRegex(ValueError, r"'GD', 'GD-', 'GR'"):
            contrastive.global_masks("SimCLR", jnp.zeros(2, int), jnp.zeros(2, int))
        with self.assertRaisesRegex(ValueError, "Unknown global contrastive strategy"):
            contrastive.global_loss(
                jnp.ones((2, 2)), jnp.zeros(2), jnp.zeros(2), strategy="LR", temperature=0.1
            )

    def test_no_recompilation_for_same_shapes(self):
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def loss_fn(z, sample_ids, partition_ids):
            return contrastive.global_loss(
                z, sample_ids, partition_ids, strategy="GD", temperature=0.1
            )

        rng = np.random.default_rng(7)
        for _ in range(3):
            sample_ids, partition_ids = make_layout("GD", rng)
            z = jnp.asarray(rng.normal(size=(len(sample_ids), 8)), jnp.float32)
            self.assertTrue(np.isfinite(loss_fn(z, sample_ids, partition_ids)))


def _per_device_layouts(strategy, rng, num_views):
    """Each device holds its own complete structured sub-batch; sample ids globally unique."""
    layouts = [
        make_layout(
            strategy,
            rng,
            num_volumes=1,
            num_partitions=4,
            num_views=num_views,
            first_sample=100 * d,
        )
        for d in range(NUM_DEVICES)
    ]
    sample_ids = np.stack([ids for ids, _ in layouts])
    partition_ids = np.stack([ids for _, ids in layouts])
    return sample_ids, partition_ids


class DataParallelGlobalLossTest(parameterized.TestCase):
    """8 fake CPU devices (tests/conftest.py): mapped loss == one device on the concatenation."""

    def setUp(self):
        super().setUp()
        if jax.device_count() < NUM_DEVICES:
            self.skipTest(f"needs {NUM_DEVICES} devices (XLA_FLAGS from tests/conftest.py)")

    @parameterized.parameters("GR", "GD-", "GD")
    def test_value_and_pmean_gradient_match_single_device(self, strategy):
        rng = np.random.default_rng(8)
        num_views = 3 if strategy == "GD-" else 2
        sample_ids, partition_ids = _per_device_layouts(strategy, rng, num_views)
        per_device = sample_ids.shape[1]
        inputs = jnp.asarray(rng.normal(size=(NUM_DEVICES, per_device, 5)), jnp.float32)
        weights = jnp.asarray(rng.normal(size=(5, 12)), jnp.float32)

        def loss_of_weights(weights, inputs, sample_ids, partition_ids, axis_name=None):
            return contrastive.global_loss(
                inputs @ weights,
                sample_ids,
                partition_ids,
                strategy=strategy,
                temperature=0.1,
                axis_name=axis_name,
            )

        def data_parallel_step(weights, inputs, sample_ids, partition_ids):
            # What a data-parallel trainer does: per-device grads, then pmean.
            loss, grads = jax.value_and_grad(loss_of_weights)(
                weights, inputs, sample_ids, partition_ids, "batch"
            )
            return loss, jax.lax.pmean(grads, "batch")

        losses, grads = jax.pmap(data_parallel_step, axis_name="batch", in_axes=(None, 0, 0, 0))(
            weights, inputs, sample_ids, partition_ids
        )
        flat_inputs = inputs.reshape(-1, 5)
        flat_ids = sample_ids.reshape(-1), partition_ids.reshape(-1)
        expected_loss, expected_grads = jax.jit(jax.value_and_grad(loss_of_weights))(
            weights, flat_inputs, *flat_ids
        )
        reference_loss = reference.global_loss(
            np.asarray(flat_inputs @ weights, np.float64), *flat_ids, strategy, 0.1
        )
        np.testing.assert_allclose(losses, np.full(NUM_DEVICES, reference_loss), rtol=1e-5)
        np.testing.assert_allclose(losses, np.full(NUM_DEVICES, expected_loss), rtol=1e-5)
        for device_grads in grads:
            np.testing.assert_allclose(device_grads, expected_grads, rtol=1e-4, atol=1e-6)

    def test_embedding_gradient_is_axis_size_times_global_slice(self):
        rng = np.random.default_rng(9)
        sample_ids, partition_ids = _per_device_layouts("GD", rng, num_views=2)
        z = jnp.asarray(rng.normal(size=(*sample_ids.shape, 8)), jnp.float32)
        loss_fn = functools.partial(contrastive.global_loss, strategy="GD", temperature=0.1)
        grads = jax.pmap(
            jax.grad(functools.partial(loss_fn, axis_name="batch")), axis_name="batch"
        )(z, sample_ids, partition_ids)
        expected = jax.jit(jax.grad(loss_fn))(
            z.reshape(-1, 8), sample_ids.reshape(-1), partition_ids.reshape(-1)
        )
        np.testing.assert_allclose(
            grads.reshape(-1, 8) / NUM_DEVICES, expected, rtol=1e-4, atol=1e-7
        )

    def test_shard_map_gives_the_same_value_and_gradient(self):
        rng = np.random.default_rng(10)
        sample_ids, partition_ids = _per_device_layouts("GD", rng, num_views=2)
        z = rng.normal(size=(*sample_ids.shape, 8)).astype(np.float32)
        mesh = jax.make_mesh((NUM_DEVICES,), ("batch",))
        sharded = [
            jax.device_put(x.reshape(-1, *x.shape[2:]), NamedSharding(mesh, P("batch")))
            for x in (z, sample_ids, partition_ids)
        ]
        loss_fn = functools.partial(contrastive.global_loss, strategy="GD", temperature=0.1)

        def per_device(z, sample_ids, partition_ids):
            loss, grad = jax.value_and_grad(functools.partial(loss_fn, axis_name="batch"))(
                z, sample_ids, partition_ids
            )
            return loss[None], grad

        losses, grads = jax.jit(
            jax.shard_map(per_device, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
        )(*sharded)
        flat = z.reshape(-1, 8), sample_ids.reshape(-1), partition_ids.reshape(-1)
        expected_loss, expected_grad = jax.jit(jax.value_and_grad(loss_fn))(*flat)
        np.testing.assert_allclose(losses, np.full(NUM_DEVICES, expected_loss), rtol=1e-5)
        np.testing.assert_allclose(grads / NUM_DEVICES, expected_grad, rtol=1e-4, atol=1e-7)


if __name__ == "__main__":
    absltest.main()
