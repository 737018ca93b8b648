"""Tests of the synthetic subjects' sampled anatomy (docs/METHOD.md §12), without rendering images.

Every check compares the sampled parameters or the background arrays with the documented ranges
(docs/METHOD.md §12, docs/DATA.md), a hand-computed case or a closed-form reference (ring areas,
a Gaussian tail probability).
"""

import dataclasses

import numpy as np
import pytest
from scipy import stats

from jaxcl.data import synthetic_anatomy

SAMPLES_PER_GROUP = 8
# Clinical ranges of the LV ejection fraction the five groups are modelled on (ACDC-like).
LV_EJECTION_FRACTION = {
    "NOR": (0.55, 0.7),
    "DCM": (0.1, 0.3),
    "HCM": (0.65, 0.8),
    "MINF": (0.25, 0.4),
    "RV": (0.5, 0.65),
}


def _sample(group, seed):
    return synthetic_anatomy.sample_anatomy(np.random.default_rng(seed), group)


@pytest.fixture(scope="module")
def anatomies():
    """group -> SAMPLES_PER_GROUP anatomies drawn from seeds 0..SAMPLES_PER_GROUP-1."""
    return {
        group: [_sample(group, seed) for seed in range(SAMPLES_PER_GROUP)]
        for group in synthetic_anatomy.GROUPS
    }


@pytest.fixture(scope="module")
def backgrounds(anatomies):
    """(anatomy, background) of the first subject of each group."""
    return [
        (group_anatomies[0], synthetic_anatomy.draw_background(group_anatomies[0]))
        for group_anatomies in anatomies.values()
    ]


def test_grid_within_spec(anatomies):
    for group_anatomies in anatomies.values():
        for a in group_anatomies:
            num_slices, height, width = a.shape
            row_mm, column_mm, slice_mm = a.spacing
            assert 8 <= num_slices <= 14
            assert 200 <= height <= 260 and 200 <= width <= 260
            assert row_mm == column_mm and 1.2 <= row_mm <= 1.8
            assert 5.0 <= slice_mm <= 10.0
            assert 60.0 <= (num_slices - 1) * slice_mm <= 110.0  # base-to-apex coverage
            assert 280.0 <= max(height, width) * row_mm <= 380.0  # field of view


def test_end_systole_ejects_blood_and_keeps_the_muscle(anatomies):
    for group, group_anatomies in anatomies.items():
        low, high = LV_EJECTION_FRACTION[group]
        for a in group_anatomies:
            ed, es = a.phases["ED"], a.phases["ES"]
            cavity_ed, cavity_es = np.pi * ed.lv_radius**2, np.pi * es.lv_radius**2
            assert low <= 1.0 - cavity_es / cavity_ed <= high
            ring_ed = np.pi * (ed.lv_radius + ed.wall) ** 2 - cavity_ed
            ring_es = np.pi * (es.lv_radius + es.wall) ** 2 - cavity_es
            assert ring_es == pytest.approx(ring_ed, rel=1e-9)
            assert es.wall > ed.wall and 0 < es.rv_depth < ed.rv_depth


def test_groups_differ_as_in_acdc(anatomies):
    def mean(group, field):
        return np.mean([getattr(a.phases["ED"], field) for a in anatomies[group]])

    assert mean("DCM", "lv_radius") > 1.2 * mean("NOR", "lv_radius")  # dilated LV ...
    assert mean("DCM", "wall") < 0.8 * mean("NOR", "wall")  # ... with a thin wall
    assert mean("HCM", "wall") > 1.5 * mean("NOR", "wall")  # hypertrophy ...
    assert mean("HCM", "lv_radius") < 0.85 * mean("NOR", "lv_radius")  # ... and a small cavity
    assert mean("RV", "rv_depth") > 1.4 * mean("NOR", "rv_depth")  # dilated RV
    for group, group_anatomies in anatomies.items():
        for a in group_anatomies:
            thinning = a.infarct[2]
            assert (thinning > 0.4) if group == "MINF" else (thinning == 0)
            assert (a.septal_bulge >= 0.3) if group == "HCM" else (a.septal_bulge <= 0.1)


def test_heart_pose_and_depth_profile(anatomies):
    for group_anatomies in anatomies.values():
        for a in group_anatomies:
            # The RV lies on the image left, a little up (pi + 0.25 rad), turned by up to 30 deg.
            assert abs(np.degrees(a.rv_angle[0] - (np.pi + 0.25))) <= 30.0
            # The RV stops in the basal ~70% of the stack; the cavity closes before the muscle.
            assert 0.6 <= a.rv_end <= 0.85 < a.cavity_end < a.heart_end


def test_same_stream_same_anatomy():
    first, again = _sample("MINF", 7), _sample("MINF", 7)
    for field in dataclasses.fields(first):
        np.testing.assert_array_equal(getattr(first, field.name), getattr(again, field.name))
    assert _sample("MINF", 8).lv_centre.tolist() != first.lv_centre.tolist()


def test_unknown_group_names_the_choices():
    with pytest.raises(ValueError, match=r"group='ABC'.*'NOR', 'DCM', 'HCM', 'MINF', 'RV'"):
        _sample("ABC", 0)


def test_background_tissues(backgrounds):
    for a, background in backgrounds:
        _, height, width = a.shape
        s = background.signal
        assert s.shape == (height, width) and s.dtype == np.float32
        assert background.lungs.shape == background.trabeculae.shape == (height, width)
        assert background.liver_extent.dtype == np.float32
        # Air around the body, outside the thorax the liver never reaches.
        for corner in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert s[corner] == np.float32(a.signal["air"])
            assert np.isinf(background.liver_extent[corner])
        # Lungs are dark, on both sides of the heart.
        lung_rows, lung_columns = np.nonzero(background.lungs)
        assert 0.1 < background.lungs.mean() < 0.4
        assert np.median(s[background.lungs]) < 0.5 * a.signal["soft"]
        lv_column = a.lv_centre[0, 0] / a.spacing[1] + (width - 1) / 2
        assert lung_columns.min() < lv_column - 20 and lung_columns.max() > lv_column + 20
        # Spinal canal and aorta lie behind the heart (rows run anterior -> posterior).
        lv_row = a.lv_centre[0, 1] / a.spacing[0] + (height - 1) / 2
        canal_rows = np.nonzero(s == np.float32(a.signal["csf"]))[0]
        aorta_rows = np.nonzero(s == np.float32(a.signal["blood"]))[0]
        assert canal_rows.min() > lv_row and aorta_rows.mean() > lv_row


def test_trabeculae_are_the_upper_gaussian_tail(backgrounds):
    # Thresholding a smooth Gaussian field at 1.6 standard deviations marks P(N > 1.6) of it.
    for _, background in backgrounds:
        assert background.trabeculae.mean() == pytest.approx(stats.norm.sf(1.6), abs=0.006)


def test_background_depends_only_on_the_anatomy(backgrounds):
    a, background = backgrounds[2]
    again = synthetic_anatomy.draw_background(a)
    for field in dataclasses.fields(background):
        np.testing.assert_array_equal(getattr(again, field.name), getattr(background, field.name))


def test_liver_grows_in_towards_the_apex(backgrounds):
    depths = np.linspace(0.0, 1.0, 11)
    for a, background in backgrounds:
        liver = synthetic_anatomy.liver_mask(a, background, depths)
        assert liver.shape == (11, *a.shape[1:]) and liver.dtype == bool
        area = liver.sum(axis=(1, 2))
        assert area[0] == 0 and area[-1] > 100, area  # absent at the base, shows at the apex
        assert np.all(np.diff(area) >= 0), area
        assert np.all(liver[1:] >= liver[:-1])  # never recedes
        assert not np.any(liver & np.isinf(background.liver_extent))


def _hand_built(lv_centre_mm, spacing_mm, size):
    """A round heart with no shape modes: ED and ES both LV radius 20, wall 10, RV depth 15 mm."""
    a = _sample("NOR", 0)
    ventricles = synthetic_anatomy.Ventricles(lv_radius=20.0, wall=10.0, rv_depth=15.0)
    return dataclasses.replace(
        a,
        shape=(10, size, size),
        spacing=(spacing_mm, spacing_mm, 8.0),
        phases={"ED": ventricles, "ES": ventricles},
        lv_centre=np.array(lv_centre_mm, float),
        lv_shape=np.zeros((2, 2)),
        septal_bulge=0.0,
    )


def test_heart_box_hand_computed():
    # Reach = 20 + 10 + 15 mm + RV wall 3 mm + fat 6 mm + 4 mm margin = 58 mm.
    # Centred, 1 mm pixels, 201 pixels (centre pixel 100): 100 -/+ 58 -> rows/columns 42..158.
    assert synthetic_anatomy.heart_box(_hand_built([[0, 0], [0, 0]], 1.0, 201)) == (
        slice(42, 159),
        slice(42, 159),
    )
    # 2 mm pixels; the centre moves from (x, y) = (0, 0) at the base to (10, -5) at the apex.
    # Rows: (-5 - 58) / 2 + 100 = 68.5 -> 68, (0 + 58) / 2 + 100 = 129 -> 129 (+1 stop).
    # Columns: (0 - 58) / 2 + 100 = 71, (10 + 58) / 2 + 100 = 134 -> 134 (+1 stop).
    assert synthetic_anatomy.heart_box(_hand_built([[0, 0], [10, -5]], 2.0, 201)) == (
        slice(68, 130),
        slice(71, 135),
    )
    # Clipped to the image: the centre 80 mm right of and 90 mm above the middle of 201 pixels.
    assert synthetic_anatomy.heart_box(_hand_built([[80, -90], [80, -90]], 1.0, 201)) == (
        slice(0, 69),
        slice(122, 201),
    )


def test_heart_box_covers_the_heart_and_is_small(anatomies):
    for group_anatomies in anatomies.values():
        for a in group_anatomies:
            rows, columns = synthetic_anatomy.heart_box(a)
            _, height, width = a.shape
            reach = max(v.lv_radius + v.wall + v.rv_depth for v in a.phases.values())
            reach += synthetic_anatomy.RV_WALL_MM + synthetic_anatomy.MAX_FAT_MM
            for x_mm, y_mm in a.lv_centre:
                row = y_mm / a.spacing[0] + (height - 1) / 2
                column = x_mm / a.spacing[1] + (width - 1) / 2
                assert rows.start <= max(row - reach / a.spacing[0], 0)
                assert rows.stop >= min(row + reach / a.spacing[0] + 1, height)
                assert columns.start <= max(column - reach / a.spacing[1], 0)
                assert columns.stop >= min(column + reach / a.spacing[1] + 1, width)
            box_area = (rows.stop - rows.start) * (columns.stop - columns.start)
            assert box_area < 0.6 * height * width  # rendering skips most of the image
