"""Tests of the local region contrastive loss and its positions against float64 numpy loops."""

import functools
import importlib.util
import pathlib
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from jaxcl.losses import local, region_kernel


def _load_reference():
    path = pathlib.Path(__file__).with_name("reference.py")
    spec = importlib.util.spec_from_file_location("losses_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _load_reference()

NUM_DEVICES = 8


def make_local_layout(strategy, rng, num_slices_or_volumes, num_partitions=3, first_sample=0):
    """Random valid ids of a local-loss batch, 2 intensity views per slice, views shuffled.

    LR: num_slices_or_volumes random slices. LD: that many volumes x num_partitions partitions.
    """
    if strategy == "LR":
        slice_partitions = rng.integers(0, num_partitions, num_slices_or_volumes)
    else:
        slice_partitions = np.tile(np.arange(num_partitions), num_slices_or_volumes)
    sample_ids = np.repeat(first_sample + np.arange(len(slice_partitions)), 2)
    partition_ids = np.repeat(slice_partitions, 2)
    order = rng.permutation(len(sample_ids))
    return sample_ids[order].astype(np.int32), partition_ids[order].astype(np.int32)


class RegionPositionsTest(absltest.TestCase):
    def test_paper_positions_for_48(self):
        # H_l = 48: w = 44, a = 0, q = 11, m = 22, t = 33, e = 44.
        expected = [
            [0, 0], [0, 22], [0, 44], [22, 0], [22, 22], [22, 44], [44, 0], [44, 22], [44, 44],
            [11, 11], [11, 33], [33, 11], [33, 33],
            [11, 22], [22, 11], [22, 33], [33, 22],
        ]  # fmt: skip
        np.testing.assert_array_equal(local.region_positions(48), expected)
        np.testing.assert_array_equal(local.region_positions(48), reference.paper_positions(48))

    def test_paper_positions_fit_3x3_windows(self):
        for size in (8, 13, 24, 48, 96):
            positions = local.region_positions(size)
            self.assertEqual(positions.shape, (17, 2))
            self.assertLen({tuple(p) for p in positions}, 17)
            self.assertTrue(np.all((positions >= 0) & (positions <= size - 3)))

    def test_grid_positions(self):
        # H_l = 48, K = 3: origins k * 45 // 2 = 0, 22, 45 (45 = last valid 3x3 origin).
        positions = local.region_positions(48, kind="grid", grid_size=3)
        origins = [0, 22, 45]
        np.testing.assert_array_equal(positions, [[u, v] for u in origins for v in origins])

    def test_paper_negative_table_matches_spec(self):
        self.assertEqual(local.PAPER_NEGATIVE_POSITIONS, reference.PAPER_NEGATIVES)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "grid_size"):
            local.region_positions(48, kind="grid")
        with self.assertRaisesRegex(ValueError, "grid_size"):
            local.region_positions(8, kind="grid", grid_size=7)
        with self.assertRaisesRegex(ValueError, "too small"):
            local.region_positions(6)
        with self.assertRaisesRegex(ValueError, "'paper', 'grid'"):
            local.region_positions(48, kind="random")


class LocalLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        strategy=("LR", "LD"),
        negatives_and_anchors=(("all", None), ("all", 5), ("paper", None)),
    )
    def test_matches_reference(self, strategy, negatives_and_anchors):
        negatives, num_anchors = negatives_and_anchors
        rng = np.random.default_rng(0)
        sample_ids, partition_ids = make_local_layout(strategy, rng, 3 if strategy == "LR" else 2)
        regions = rng.normal(size=(len(sample_ids), 17, 8))
        loss_fn = self.variant(
            functools.partial(
                local.local_loss,
                strategy=strategy,
                temperature=0.1,
                negatives=negatives,
                num_anchors=num_anchors,
                views_per_group=2 if strategy == "LR" else 4,
            )
        )
        loss = loss_fn(jnp.asarray(regions, jnp.float32), sample_ids, partition_ids)
        # Default anchors: all 17 positions with "all", the paper's first 13 with "paper".
        default_anchors = 17 if negatives == "all" else 13
        expected = reference.local_loss(
            regions,
            sample_ids,
            partition_ids,
            strategy,
            0.1,
            negatives,
            num_anchors or default_anchors,
        )
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    def test_grid_positions_match_reference(self):
        rng = np.random.default_rng(1)
        sample_ids, partition_ids = make_local_layout("LD", rng, 3, num_partitions=2)
        regions = rng.normal(size=(len(sample_ids), 9, 6))
        loss_fn = functools.partial(
            local.local_loss, strategy="LD", temperature=0.2, views_per_group=6
        )
        loss = jax.jit(loss_fn)(jnp.asarray(regions, jnp.float32), sample_ids, partition_ids)
        expected = reference.local_loss(regions, sample_ids, partition_ids, "LD", 0.2, "all", 9)
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    @parameterized.product(strategy=("LR", "LD"), num_anchors=(None, 7), temperature=(0.1, 0.01))
    def test_all_negatives_in_chunks_match_reference(self, strategy, num_anchors, temperature):
        # A block budget of two anchor positions' similarities: 9 (or 7) anchor positions run as
        # 5 (or 4) chunks, the last one padded.
        rng = np.random.default_rng(7)
        sample_ids, partition_ids = make_local_layout(strategy, rng, 3 if strategy == "LR" else 2)
        views_per_group = 2 if strategy == "LR" else 4
        num_groups = len(sample_ids) // views_per_group
        regions = rng.normal(size=(len(sample_ids), 9, 6))
        loss_fn = functools.partial(
            local.local_loss,
            strategy=strategy,
            temperature=temperature,
            num_anchors=num_anchors,
            views_per_group=views_per_group,
        )
        with mock.patch.object(
            region_kernel, "CHUNK_ELEMENTS", 2 * num_groups * views_per_group**2 * 9
        ):
            loss = jax.jit(loss_fn)(jnp.asarray(regions, jnp.float32), sample_ids, partition_ids)
        expected = reference.local_loss(
            regions, sample_ids, partition_ids, strategy, temperature, "all", num_anchors or 9
        )
        np.testing.assert_allclose(loss, expected, rtol=1e-5)

    @parameterized.parameters(None, 2)
    def test_all_negatives_gradient_matches_finite_differences(self, chunk_positions):
        # The "all" kernel computes its gradients by hand; check them against central differences
        # of the float64 reference, in one block and in blocks of 2 anchor positions (the last of
        # the 3 anchors padded). Positions 3 and 4 are negatives only.
        rng = np.random.default_rng(8)
        sample_ids, partition_ids = make_local_layout("LD", rng, 2, num_partitions=2)
        regions = rng.normal(size=(len(sample_ids), 5, 3))

        def reference_loss(x):
            return reference.local_loss(x, sample_ids, partition_ids, "LD", 0.2, "all", 3)

        step = 1e-5
        expected = np.zeros_like(regions)
        for index in np.ndindex(regions.shape):
            offset = np.zeros_like(regions)
            offset[index] = step
            expected[index] = (
                reference_loss(regions + offset) - reference_loss(regions - offset)
            ) / (2 * step)
        loss_fn = functools.partial(
            local.local_loss,
            sample_ids=sample_ids,
            partition_ids=partition_ids,
            strategy="LD",
            temperature=0.2,
            num_anchors=3,
            views_per_group=4,
        )
        chunk_elements = (
            region_kernel.CHUNK_ELEMENTS if chunk_positions is None else 2 * 2 * 4 * 4 * 5
        )
        with mock.patch.object(region_kernel, "CHUNK_ELEMENTS", chunk_elements):
            grad = jax.jit(jax.grad(loss_fn))(jnp.asarray(regions, jnp.float32))
        np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-5)

    def test_all_negatives_memory_is_far_below_one_similarity_tensor(self):
        # L^D, 48 slices x 2 views, a 22 x 22 grid, D = 128: 4 partitions of 24 views. The
        # (G, V·R, V·R) float32 similarities alone would take 2.1 GB; the chunked kernel's
        # scratch memory (forward and backward) must stay a fraction of that.
        sample_ids = np.tile(np.arange(48), 2).astype(np.int32)
        partition_ids = sample_ids % 4
        regions = jax.ShapeDtypeStruct((96, 484, 128), jnp.float32)
        loss_fn = functools.partial(
            local.local_loss,
            sample_ids=sample_ids,
            partition_ids=partition_ids,
            strategy="LD",
            temperature=0.1,
        )
        memory = jax.jit(jax.value_and_grad(loss_fn)).lower(regions).compile().memory_analysis()
        if memory is None:
            self.skipTest("this backend reports no memory analysis")
        similarity_bytes = 4 * (24 * 484) ** 2 * 4
        self.assertLess(memory.temp_size_in_bytes, similarity_bytes / 8)

    def test_paper_negatives_equal_original_code_up_to_its_normalisation(self):
        # The original sums 2 terms per slice and position, divided by 13; jaxcl takes the mean
        # over the 2 * num_slices * 13 terms (docs/METHOD.md §13): original = jaxcl * 2 *
        # num_slices.
        rng = np.random.default_rng(2)
        num_slices = 4
        regions = rng.normal(size=(2 * num_slices, 17, 16))
        sample_ids = np.repeat(np.arange(num_slices), 2)
        loss_fn = functools.partial(
            local.local_loss, strategy="LR", temperature=0.1, negatives="paper", views_per_group=2
        )
        loss = jax.jit(loss_fn)(
            jnp.asarray(regions, jnp.float32), sample_ids, np.zeros_like(sample_ids)
        )
        expected = reference.original_local_loss(regions, 0.1)
        np.testing.assert_allclose(loss * 2 * num_slices, expected, rtol=1e-5)

    @parameterized.parameters("LR", "LD")
    def test_permuting_views_with_their_ids_leaves_the_loss_unchanged(self, strategy):
        rng = np.random.default_rng(3)
        sample_ids, partition_ids = make_local_layout(strategy, rng, 3)
        regions = jnp.asarray(rng.normal(size=(len(sample_ids), 17, 8)), jnp.float32)
        loss_fn = jax.jit(
            functools.partial(
                local.local_loss,
                strategy=strategy,
                temperature=0.1,
                negatives="paper",
                views_per_group=2 if strategy == "LR" else 6,
            )
        )
        order = rng.permutation(len(sample_ids))
        np.testing.assert_allclose(
            loss_fn(regions[order], sample_ids[order], partition_ids[order]),
            loss_fn(regions, sample_ids, partition_ids),
            rtol=1e-6,
        )

    @parameterized.parameters("all", "paper")
    def test_identical_regions_give_known_value_and_finite_gradients(self, negatives):
        # All similarities equal 1/τ: each term is log(1 + #negatives). LR, 2 views, 17 positions:
        # "all" has 2 views x 16 positions = 32 negatives, "paper" 2 views x 5 = 10.
        sample_ids = np.array([0, 0, 1, 1])
        loss_fn = functools.partial(
            local.local_loss, strategy="LR", temperature=0.1, negatives=negatives, views_per_group=2
        )
        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(
            jnp.ones((4, 17, 8)), sample_ids, sample_ids
        )
        np.testing.assert_allclose(loss, np.log(33.0 if negatives == "all" else 11.0), rtol=1e-6)
        self.assertTrue(np.all(np.isfinite(grad)))

    def test_small_temperature_with_unit_vectors_does_not_overflow(self):
        rng = np.random.default_rng(4)
        sample_ids, partition_ids = make_local_layout("LD", rng, 2)
        regions = reference.normalize(rng.normal(size=(len(sample_ids), 17, 8)))
        regions[0, 1] = regions[0, 0] + 1e-3  # a negative with logit ~ +100 at τ = 0.01
        loss_fn = functools.partial(
            local.local_loss, strategy="LD", temperature=0.01, views_per_group=4
        )
        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(
            jnp.asarray(regions, jnp.float32), sample_ids, partition_ids
        )
        self.assertTrue(np.all(np.isfinite(grad)))
        expected = reference.local_loss(regions, sample_ids, partition_ids, "LD", 0.01, "all", 17)
        np.testing.assert_allclose(loss, expected, rtol=1e-4)

    def test_bad_layouts_raise_eagerly_and_give_nan_under_jit(self):
        regions = jnp.ones((6, 17, 4))
        unequal = np.array([0, 0, 0, 0, 1, 1])
        with self.assertRaisesRegex(ValueError, "same number of views"):
            local.local_loss(regions, unequal, unequal, strategy="LR", temperature=0.1)
        with self.assertRaisesRegex(ValueError, "views_per_group"):
            jax.jit(functools.partial(local.local_loss, strategy="LR", temperature=0.1))(
                regions, unequal, unequal
            )
        jitted = jax.jit(
            functools.partial(local.local_loss, strategy="LR", temperature=0.1, views_per_group=2)
        )
        self.assertTrue(np.isnan(jitted(regions, unequal, unequal)))
        # Groups of 3 or 4 views cut into blocks of views_per_group=2 are caught as well.
        pairs = np.array([0, 0, 1, 1, 2, 2])
        self.assertTrue(np.isfinite(jitted(regions, pairs, pairs)))
        triples = np.array([0, 0, 0, 1, 1, 1])
        self.assertTrue(np.isnan(jitted(regions, triples, triples)))
        quads = np.array([0, 0, 0, 0, 1, 1, 1, 1])
        self.assertTrue(np.isnan(jitted(jnp.ones((8, 17, 4)), quads, quads)))

    def test_bad_arguments(self):
        regions, ids = jnp.ones((4, 9, 4)), np.array([0, 0, 1, 1])
        call = functools.partial(local.local_loss, regions, ids, ids, temperature=0.1)
        with self.assertRaisesRegex(ValueError, r"\['LD', 'LR'\]"):
            call(strategy="GR")
        with self.assertRaisesRegex(ValueError, "17 paper positions"):
            call(strategy="LR", negatives="paper")
        with self.assertRaisesRegex(ValueError, "negatives"):
            call(strategy="LR", negatives="near")
        with self.assertRaisesRegex(ValueError, "num_anchors"):
            call(strategy="LR", num_anchors=10)

    def test_no_recompilation_for_same_shapes(self):
        chex.clear_trace_counter()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def loss_fn(regions, sample_ids, partition_ids):
            return local.local_loss(
                regions, sample_ids, partition_ids, strategy="LD", temperature=0.1,
                negatives="paper", views_per_group=4,
            )  # fmt: skip

        rng = np.random.default_rng(5)
        for _ in range(3):
            sample_ids, partition_ids = make_local_layout("LD", rng, 2)
            regions = jnp.asarray(rng.normal(size=(len(sample_ids), 17, 8)), jnp.float32)
            self.assertTrue(np.isfinite(loss_fn(regions, sample_ids, partition_ids)))


class DataParallelLocalLossTest(parameterized.TestCase):
    """8 fake CPU devices: mapped loss and pmean-ed gradients == one device on the concatenation.

    LR groups (slices) stay on their device; LD groups (partitions) span all devices.
    """

    def setUp(self):
        super().setUp()
        if jax.device_count() < NUM_DEVICES:
            self.skipTest(f"needs {NUM_DEVICES} devices (XLA_FLAGS from tests/conftest.py)")

    @parameterized.product(strategy=("LR", "LD"), negatives=("all", "paper"))
    def test_value_and_pmean_gradient_match_single_device(self, strategy, negatives):
        rng = np.random.default_rng(6)
        layouts = [
            make_local_layout(strategy, rng, 2, num_partitions=2, first_sample=100 * d)
            for d in range(NUM_DEVICES)
        ]
        sample_ids = np.stack([ids for ids, _ in layouts])
        partition_ids = np.stack([ids for _, ids in layouts])
        per_device = sample_ids.shape[1]
        inputs = jnp.asarray(rng.normal(size=(NUM_DEVICES, per_device, 17, 5)), jnp.float32)
        weights = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
        views_per_group = 2 if strategy == "LR" else 4
        # LR groups stay on one device; an LD partition gathers its views from all devices.
        global_views_per_group = (
            views_per_group if strategy == "LR" else NUM_DEVICES * views_per_group
        )

        def loss_of_weights(weights, inputs, sample_ids, partition_ids, **kwargs):
            return local.local_loss(
                inputs @ weights,
                sample_ids,
                partition_ids,
                strategy=strategy,
                temperature=0.1,
                negatives=negatives,
                **kwargs,
            )

        def data_parallel_step(weights, inputs, sample_ids, partition_ids):
            loss, grads = jax.value_and_grad(loss_of_weights)(
                weights,
                inputs,
                sample_ids,
                partition_ids,
                views_per_group=views_per_group,
                axis_name="batch",
            )
            return loss, jax.lax.pmean(grads, "batch")

        losses, grads = jax.pmap(data_parallel_step, axis_name="batch", in_axes=(None, 0, 0, 0))(
            weights, inputs, sample_ids, partition_ids
        )
        flat = inputs.reshape(-1, 17, 5), sample_ids.reshape(-1), partition_ids.reshape(-1)
        expected_loss, expected_grads = jax.jit(
            jax.value_and_grad(
                functools.partial(loss_of_weights, views_per_group=global_views_per_group)
            )
        )(weights, *flat)
        np.testing.assert_allclose(losses, np.full(NUM_DEVICES, expected_loss), rtol=1e-5)
        for device_grads in grads:
            np.testing.assert_allclose(device_grads, expected_grads, rtol=1e-4, atol=1e-6)

    def test_partitions_missing_on_a_device_give_nan(self):
        # LD needs every device to hold the same partitions; device 0 here holds other ones.
        ids = np.tile(np.array([0, 0, 1, 1]), (NUM_DEVICES, 1))
        ids[0] = [2, 2, 3, 3]
        losses = jax.pmap(
            functools.partial(
                local.local_loss,
                strategy="LD",
                temperature=0.1,
                views_per_group=2,
                axis_name="batch",
            ),
            axis_name="batch",
        )(jnp.ones((NUM_DEVICES, 4, 9, 4)), ids, ids)
        self.assertTrue(np.all(np.isnan(losses)))


if __name__ == "__main__":
    absltest.main()
