"""Built-in synthetic short-axis cardiac cine-MRI dataset (SPEC §10), written in the ACDC layout.

Each subject comes from its own random stream derived from (seed, subject index), so subject k is
the same whatever the number of subjects. A subject is a stack of 8-14 short-axis slices ordered
base (z=0) -> apex at end-diastole (frame 01) and end-systole (smaller cavities, thicker walls).
The scene is drawn in millimetres as tissue layers (body fat, chest-wall muscle, lungs, liver,
spine, aorta, pericardial fat, ventricles) with smoothly warped outlines; each slice averages the
anatomy across its thickness. It then gets an MR-like appearance: random gamma, texture, in-plane
blur, a smooth multiplicative bias field and Rician noise. Heart geometry is a function of the
relative depth t = z / (Z - 1), the same for every subject (what the G^D strategy exploits).

Conventions: array rows run anterior -> posterior and columns patient right -> left (RV on the
image left). On disk the NIfTI axes are (X, Y, Z) = (row, column, slice) under a diagonal positive
affine equal to the header spacing (already RAS-canonical, so reorienting keeps the slice axis and
its base -> apex order).

Command line:
  python -m jaxcl.data.synthetic --out DIR [--num-subjects 60] [--seed 0] [--montage montage.png]
"""

import argparse
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
ED_FRAME = 1

# Relative bSSFP signal of each tissue before per-subject jitter: blood and fat are bright;
# myocardium, skeletal muscle, liver and mediastinal tissue overlap; lungs and air are dark.
_TISSUE_SIGNAL = {
    "air": 0.0,
    "fat": 0.8,
    "muscle": 0.3,
    "soft": 0.4,
    "lung": 0.05,
    "liver": 0.38,
    "bone": 0.5,
    "csf": 0.85,
    "blood": 0.95,
    "rv_blood": 0.9,
    "myocardium": 0.3,
}
# Per group, end-diastolic ranges of: LV cavity radius and wall thickness at the base (mm), RV
# crescent depth (mm) and half-width (degrees), LV and RV ejection fractions.
_GROUP_RANGES = {
    "NOR": ((22, 27), (7, 10), (16, 24), (60, 80), (0.55, 0.7), (0.5, 0.6)),
    "DCM": ((31, 37), (5, 7), (16, 24), (60, 80), (0.1, 0.3), (0.35, 0.5)),
    "HCM": ((15, 20), (13, 19), (14, 20), (60, 80), (0.65, 0.8), (0.5, 0.6)),
    "MINF": ((26, 32), (7, 10), (16, 24), (60, 80), (0.25, 0.4), (0.4, 0.55)),
    "RV": ((21, 26), (7, 10), (28, 40), (75, 95), (0.5, 0.65), (0.15, 0.3)),
}
_RV_WALL_MM = 3.0
_MAX_FAT_MM = 6.0
_SUBDEPTHS = (-1 / 3, 0.0, 1 / 3)  # through-plane samples per slice, in slice spacings


@dataclasses.dataclass(frozen=True)
class _Ventricles:
    """Heart sizes (mm) at one cardiac phase, at the base (t = 0)."""

    lv_radius: float
    wall: float
    rv_depth: float


@dataclasses.dataclass(frozen=True)
class _Anatomy:
    """Everything random about one subject except its noise (lengths in mm, angles in radians).

    Positions are relative to the image centre, x to the image right, y to the image bottom.
    Depth-dependent quantities are given at the base and apex and interpolated linearly in t.
    """

    group: str
    shape: tuple[int, int, int]  # (Z, H, W)
    spacing: tuple[float, float, float]  # (row, column, slice)
    phases: dict[str, _Ventricles]  # "ED", "ES"
    lv_centre: np.ndarray  # (2, 2): (base, apex) x (x, y)
    rv_angle: np.ndarray  # (2,): direction of the RV seen from the LV centre, base and apex
    rv_half_width: float
    cavity_end: float  # relative depth where the LV cavity closes (< 1: myocardium-only apex)
    heart_end: float  # relative depth where the myocardium ends
    rv_end: float  # relative depth where the RV ends (~0.7)
    lv_shape: np.ndarray  # (2, 2): cavity outline Fourier modes 2 and 3, (amplitude, phase)
    septal_bulge: float  # asymmetric septal hypertrophy (HCM), fraction of the wall
    infarct: np.ndarray  # (5,): angle, half-width, thinning, first and last relative depth
    papillary: np.ndarray  # (3,): two angles (from the RV direction) and the radius
    outflow: np.ndarray  # (2,): angle and radius / LV radius of the basal atrium/outflow tract
    fat_profile: np.ndarray  # (4, 2): pericardial fat Fourier modes 1-4, (amplitude, phase)
    # body (8,): centre x, y, angle, half-width, half-depth, fat, muscle and extra back thickness.
    body: np.ndarray
    liver: np.ndarray  # (2,): first relative depth it shows in, size / body half-width
    # spine (7,): vertebra x, y (from the back of the thorax), radius, canal offset, aorta dx, dy,
    # aorta radius.
    spine: np.ndarray
    texture_seed: int  # seeds the outline warp and lung vessels
    signal: dict[str, float]
    gamma: float
    bias: np.ndarray  # (6,): log-bias coefficients of x, y, x^2, y^2, xy, t (x, y in [-1, 1])
    blur_sigma: float  # in-plane partial-volume blur, pixels
    noise_level: float  # Rician sigma relative to the blood signal
    max_value: float  # blood intensity on disk


@dataclasses.dataclass(frozen=True)
class SyntheticSubject:
    """One generated subject in memory.

    Attributes:
      subject_id: "000".."999"; its folder is f"patient{subject_id}".
      group: one of GROUPS.
      images: frame number -> (Z, H, W) int16 magnitude image, z = 0 the base.
      labels: frame number -> (Z, H, W) uint8 labels (0 bg, 1 RV, 2 Myo, 3 LV).
      spacing: (row, column, slice) spacing in mm.
      es_frame: end-systolic frame number (end-diastole is ED_FRAME).
      info: Info.cfg entries.
    """

    subject_id: str
    group: str
    images: dict[int, np.ndarray]
    labels: dict[int, np.ndarray]
    spacing: tuple[float, float, float]
    es_frame: int
    info: dict[str, str]


def _sample_anatomy(rng: np.random.Generator, group: str) -> _Anatomy:
    """Draws the geometry and appearance of one subject of the given group."""
    u = rng.uniform
    num_slices = int(rng.integers(8, 15))
    # Stacks cover 60-110 mm from base to apex, as clinical short-axis stacks do.
    slice_mm = u(max(5.0, 60.0 / (num_slices - 1)), min(10.0, 110.0 / (num_slices - 1)))
    height, width = (int(n) for n in rng.integers(200, 261, size=2))
    # A 280-380 mm field of view, within the 1.2-1.8 mm pixel range.
    pixel_mm = u(max(1.2, 280.0 / max(height, width)), min(1.8, 380.0 / max(height, width)))

    lv_range, wall_range, rv_range, rv_width, lv_ef, rv_ef = _GROUP_RANGES[group]
    scale = u(0.9, 1.1)
    ed = _Ventricles(u(*lv_range) * scale, u(*wall_range) * scale, u(*rv_range) * scale)
    # End-systole: the cavity area shrinks by the ejection fraction, the myocardial area is kept.
    es_radius = ed.lv_radius * np.sqrt(1.0 - u(*lv_ef))
    es_outer = np.sqrt((ed.lv_radius + ed.wall) ** 2 - ed.lv_radius**2 + es_radius**2)
    es = _Ventricles(es_radius, es_outer - es_radius, ed.rv_depth * (1.0 - u(*rv_ef)) ** 0.7)

    body = np.array([u(-10, 10), u(0, 20), np.deg2rad(u(-8, 8)), u(150, 190), u(100, 125)])
    body = np.concatenate([body, [u(8, 25), u(8, 16), u(10, 25)]])
    inner_depth = body[4] - body[5] - body[6] - body[7]
    # The heart sits anterior in the thorax, left of the midline (image right).
    rotation = np.array([[np.cos(body[2]), -np.sin(body[2])], [np.sin(body[2]), np.cos(body[2])]])
    base_centre = body[:2] + rotation @ [u(5, 30), -inner_depth * u(0.15, 0.35)]
    rv_angle = np.pi + 0.25 + np.deg2rad(u(-30, 30))
    infarct_depths = sorted(u(0.0, 1.0, size=2) * [0.5, 1.0])
    fat_amplitude = u(0.5, 2.5, size=4) / np.arange(1, 5)
    return _Anatomy(
        group=group,
        shape=(num_slices, height, width),
        spacing=(pixel_mm, pixel_mm, slice_mm),
        phases={"ED": ed, "ES": es},
        lv_centre=np.stack([base_centre, base_centre + u(-10, 10, size=2)]),
        rv_angle=np.array([rv_angle, rv_angle + np.deg2rad(u(-8, 8))]),
        rv_half_width=float(np.deg2rad(u(*rv_width))),
        cavity_end=u(0.9, 1.03),
        heart_end=u(1.1, 1.2),
        rv_end=u(0.65, 0.8),
        lv_shape=np.stack([u(0, 0.08, size=2), u(-np.pi, np.pi, size=2)], axis=1),
        septal_bulge=u(0.3, 0.5) if group == "HCM" else u(0.0, 0.1),
        infarct=np.array(
            [u(-np.pi, np.pi), np.deg2rad(u(30, 55)), u(0.45, 0.65) if group == "MINF" else 0.0]
            + infarct_depths
        ),
        papillary=np.array([np.deg2rad(136 + u(-15, 15)), np.deg2rad(-94 + u(-15, 15)), u(3, 5)]),
        outflow=np.array([np.deg2rad(rng.choice([50, -100]) + u(-15, 15)), u(0.45, 0.7)]),
        fat_profile=np.stack([fat_amplitude, u(-np.pi, np.pi, size=4)], axis=1),
        body=body,
        liver=np.array([u(0.35, 0.6), u(0.5, 0.7)]),
        spine=np.array([u(-8, 8), u(-5, 8), u(13, 17), u(20, 24), u(18, 30), -u(18, 26), u(9, 13)]),
        texture_seed=int(rng.integers(2**31)),
        signal={name: value * u(0.85, 1.15) for name, value in _TISSUE_SIGNAL.items()},
        gamma=u(0.7, 1.4),
        bias=rng.normal(0.0, 0.2, size=6) + [0.0, -0.25, 0.0, 0.0, 0.0, 0.0],
        blur_sigma=u(0.6, 1.2),
        noise_level=u(0.02, 0.06),
        max_value=u(300, 1500),
    )


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _fourier(phi: np.ndarray, modes: np.ndarray, first: int) -> np.ndarray:
    """sum_k amplitude_k cos((first + k) phi - phase_k) for modes (K, 2) = (amplitude, phase)."""
    return sum(
        float(amplitude) * np.cos((first + k) * phi - float(phase))
        for k, (amplitude, phase) in enumerate(modes)
    )


@dataclasses.dataclass(frozen=True)
class _Background:
    """The depth-independent part of one subject's scene, (H, W) arrays.

    Attributes:
      signal: float32 tissue signal of body, chest wall and ribs, lungs, spine and aorta.
      lungs: bool lung mask.
      liver_extent: float32; the liver covers a pixel at relative depth t where
        liver_extent < growth(t) (inf where it never does).
      trabeculae: bool spots where blood next to the ventricular walls shows muscle bundles.
    """

    signal: np.ndarray
    lungs: np.ndarray
    liver_extent: np.ndarray
    trabeculae: np.ndarray


def _background(anatomy: _Anatomy) -> _Background:
    """Draws the depth-independent part of the scene."""
    a, s = anatomy, anatomy.signal
    _, height, width = a.shape
    texture_rng = np.random.default_rng(a.texture_seed)
    y = (np.arange(height) - (height - 1) / 2)[:, None] * a.spacing[0]
    x = (np.arange(width) - (width - 1) / 2)[None, :] * a.spacing[1]
    bx, by, angle, half_width, half_depth, fat, muscle, back = (float(v) for v in a.body)
    xb = np.cos(angle) * (x - bx) + np.sin(angle) * (y - by)
    yb = -np.sin(angle) * (x - bx) + np.cos(angle) * (y - by)
    # Smooth random warps (sums of plane waves of 150 mm and 60 mm wavelengths in random
    # directions) make the outlines organic.
    for wavelength, amplitude in ((150.0, 6.0), (60.0, 1.5)):
        direction, phase = texture_rng.uniform(0, 2 * np.pi, size=(2, 2, 5))
        weight = texture_rng.normal(0.0, amplitude / np.sqrt(2.5), size=(2, 5))
        k = 2 * np.pi / wavelength
        xb, yb = (
            coordinate
            + sum(
                w * np.cos(k * (np.cos(d) * xb + np.sin(d) * yb) + p)
                for d, p, w in zip(direction[c], phase[c], weight[c], strict=True)
            )
            for c, coordinate in enumerate((xb, yb))
        )

    def ellipse(cx, cy, rx, ry):
        return ((xb - cx) / rx) ** 2 + ((yb - cy) / ry) ** 2

    # The thorax is shifted forward: the back (spine, paraspinal muscles) is thicker.
    inner_width, inner_depth = half_width - fat - muscle, half_depth - fat - muscle - back
    signal = np.full((height, width), s["air"], np.float32)
    signal[ellipse(0, 0, half_width, half_depth) < 1] = s["fat"]
    signal[ellipse(0, 0, half_width - fat, half_depth - fat) < 1] = s["muscle"]
    thorax = ellipse(0, -back, inner_width, inner_depth) < 1
    signal[thorax] = s["soft"]
    # Ribs around the thorax (dark cortex, grey marrow), none in front of the spine.
    rib_angles = texture_rng.uniform(-np.pi, np.pi, size=14)
    for rib_angle in rib_angles[np.abs(rib_angles - np.pi / 2) > 0.5]:
        rib_x = (inner_width + muscle / 2) * np.cos(rib_angle)
        rib_y = -back + (inner_depth + muscle / 2) * np.sin(rib_angle)
        rib_radius = texture_rng.uniform(4.0, 6.0)
        signal[ellipse(rib_x, rib_y, rib_radius, rib_radius) < 1] = 0.3 * s["muscle"]
        signal[ellipse(rib_x, rib_y, rib_radius - 1.5, rib_radius - 1.5) < 1] = s["bone"]

    vx, vy, vertebra_radius, canal_offset, aorta_dx, aorta_dy, aorta_radius = (
        float(v) for v in a.spine
    )
    vy += half_depth - fat - muscle - 2 * back  # at the back of the thorax
    posterior_mediastinum = (ellipse(vx, vy, vertebra_radius + 12, vertebra_radius + 20) < 1) | (
        ellipse(vx + aorta_dx, vy + aorta_dy, aorta_radius + 6, aorta_radius + 6) < 1
    )
    iw, idp, cy = inner_width, inner_depth, -back
    right_lung = ellipse(-0.48 * iw, cy + 0.05 * idp, 0.5 * iw, 0.85 * idp) < 1
    left_lung = ellipse(0.5 * iw, cy + 0.1 * idp, 0.45 * iw, 0.8 * idp) < 1
    anterior_mediastinum = ellipse(0, cy - 0.7 * idp, 0.15 * iw, 0.35 * idp) < 1
    lungs = thorax & (right_lung | left_lung) & ~anterior_mediastinum & ~posterior_mediastinum
    vessels = ndimage.gaussian_filter(texture_rng.standard_normal((height, width)), 1.5)
    vessels = np.clip(vessels / vessels.std() - 2.2, 0.0, 1.0)
    signal[lungs] = (s["lung"] + 0.35 * vessels)[lungs]
    signal[ellipse(vx, vy, vertebra_radius, vertebra_radius) < 1] = s["bone"]
    signal[ellipse(vx, vy + canal_offset, 7, 7) < 1] = s["csf"]
    signal[ellipse(vx + aorta_dx, vy + aorta_dy, aorta_radius, aorta_radius) < 1] = s["blood"]

    liver_size = float(a.liver[1])
    liver_extent = ellipse(
        -0.5 * half_width, 0.65 * half_depth, liver_size * half_width, 0.85 * half_depth
    )
    liver_extent[~thorax | posterior_mediastinum] = np.inf
    trabeculae = ndimage.gaussian_filter(texture_rng.standard_normal((height, width)), 0.7)
    return _Background(
        signal=signal,
        lungs=lungs,
        liver_extent=liver_extent.astype(np.float32),
        trabeculae=trabeculae > 1.6 * trabeculae.std(),
    )


def _heart_box(anatomy: _Anatomy) -> tuple[slice, slice]:
    """Rows and columns of the image that can contain the heart or its pericardial fat."""
    a = anatomy
    reach = (
        max(
            v.lv_radius * (1 + a.lv_shape[:, 0].sum()) + v.wall * (1 + a.septal_bulge) + v.rv_depth
            for v in a.phases.values()
        )
        + _RV_WALL_MM
        + _MAX_FAT_MM
        + 4.0
    )
    box = []
    # lv_centre[:, 1] (y) runs along rows, lv_centre[:, 0] (x) along columns.
    for centre_mm, spacing, size in (
        (a.lv_centre[:, 1], a.spacing[0], a.shape[1]),
        (a.lv_centre[:, 0], a.spacing[1], a.shape[2]),
    ):
        lo_px = (centre_mm.min() - reach) / spacing + (size - 1) / 2
        hi_px = (centre_mm.max() + reach) / spacing + (size - 1) / 2
        box.append(
            slice(int(np.clip(np.floor(lo_px), 0, size)), int(np.clip(np.ceil(hi_px) + 1, 0, size)))
        )
    return box[0], box[1]


def _render(
    anatomy: _Anatomy,
    phase: str,
    depths: np.ndarray,
    background: _Background,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free tissue signal and labels of the scene at the given relative depths.

    Args:
      anatomy: the subject.
      phase: "ED" or "ES".
      depths: (D,) relative depths, 0 the base, 1 the apical slice.
      background: _background(anatomy).

    Returns:
      signal (D, H, W) float32 and labels (D, H, W) uint8.
    """
    a, s = anatomy, anatomy.signal
    t = np.asarray(depths, np.float32)[:, None, None]
    liver_start = float(a.liver[0])
    liver_growth = np.clip((t - liver_start) / (1.15 - liver_start), 0.0, 1.0) ** 1.2
    liver = background.liver_extent < liver_growth
    signal = np.where(liver, np.float32(s["liver"]), background.signal)
    labels = np.zeros(signal.shape, np.uint8)

    # The heart, in polar coordinates about the LV centre (angles from the RV direction), is only
    # computed inside its bounding box; box_* are views into the full arrays.
    rows, cols = _heart_box(a)
    box_signal, box_labels = signal[:, rows, cols], labels[:, rows, cols]
    _, height, width = a.shape
    y = ((np.arange(height)[rows] - (height - 1) / 2) * a.spacing[0]).astype(np.float32)
    x = ((np.arange(width)[cols] - (width - 1) / 2) * a.spacing[1]).astype(np.float32)
    centre = (a.lv_centre[0] + t[..., None] * (a.lv_centre[1] - a.lv_centre[0])).astype(np.float32)
    dx, dy = x[None, None, :] - centre[..., 0], y[None, :, None] - centre[..., 1]
    radius = np.hypot(dx, dy)
    rv_direction = (a.rv_angle[0] + t * (a.rv_angle[1] - a.rv_angle[0])).astype(np.float32)
    phi = _wrap(np.arctan2(dy, dx) - rv_direction)

    v = a.phases[phase]
    cavity = v.lv_radius * np.sqrt(np.clip(1.0 - (t / a.cavity_end) ** 2, 0.0, None))
    epi = (v.lv_radius + v.wall) * np.sqrt(np.clip(1.0 - (t / a.heart_end) ** 2, 0.0, None))
    wall = (epi - cavity) * (1.0 + a.septal_bulge * np.exp(-0.5 * (phi / 0.8) ** 2))
    infarct_angle, infarct_width, thinning, infarct_top, infarct_bottom = (
        float(f) for f in a.infarct
    )
    if thinning > 0:
        infarct = thinning * ((t >= infarct_top) & (t <= infarct_bottom + 0.2))
        wall *= 1.0 - infarct * np.exp(-0.5 * (_wrap(phi - infarct_angle) / infarct_width) ** 2)
    endo_radius = cavity * (1.0 + _fourier(phi, a.lv_shape, 2))
    epi_radius = endo_radius + wall
    rv_depth = v.rv_depth * np.sqrt(np.clip(1.0 - (t / a.rv_end) ** 2, 0.0, None))
    rv_outer = epi_radius + rv_depth * np.sqrt(
        np.clip(1.0 - (phi / a.rv_half_width) ** 2, 0.0, None)
    )
    has_rv = (rv_depth > 0) & (np.abs(phi) < a.rv_half_width * 1.1)
    heart_outer = np.where(has_rv, rv_outer + _RV_WALL_MM, epi_radius)
    fat = np.clip(_fourier(phi, a.fat_profile, 1), 0.0, _MAX_FAT_MM)
    heart_present = epi > 0

    # Layers: lung pushed back from the heart, pericardial fat, myocardium and unlabelled RV free
    # wall, blood pools; papillary muscles have the myocardial signal but belong to the LV label.
    lung_contact = heart_present & (radius < heart_outer + fat + 2.0)
    box_signal[lung_contact & background.lungs[rows, cols] & ~liver[:, rows, cols]] = s["soft"]
    box_signal[heart_present & (radius < heart_outer + fat)] = s["fat"]
    myocardium = radius < epi_radius
    lv = radius < endo_radius
    rv_blood = has_rv & ~myocardium & (radius < rv_outer)
    rv_wall = has_rv & ~myocardium & ~rv_blood & (radius < rv_outer + _RV_WALL_MM)
    box_signal[myocardium | rv_wall] = s["myocardium"]
    box_signal[lv] = s["blood"]
    box_signal[rv_blood] = s["rv_blood"]
    # Trabeculae: muscle-signal spots in the blood next to the walls, labelled as blood.
    trabeculae = background.trabeculae[rows, cols] & (
        (lv & (radius > endo_radius - 3.0) & (t > 0.2)) | (rv_blood & (radius > rv_outer - 5.0))
    )
    box_signal[trabeculae] = s["myocardium"]
    box_labels[myocardium] = 2
    box_labels[lv] = 3
    box_labels[rv_blood] = 1
    papillary_taper = np.sin(np.pi * np.clip((t - 0.1) / 0.7, 0.0, 1.0))
    papillary_radius = float(a.papillary[2]) * np.sqrt(np.clip(papillary_taper, 0.0, None))
    for papillary_angle in a.papillary[:2].tolist():
        offset = cavity - 1.1 * papillary_radius
        px = centre[..., 0] + offset * np.cos(papillary_angle + rv_direction)
        py = centre[..., 1] + offset * np.sin(papillary_angle + rv_direction)
        muscle = (x[None, None, :] - px) ** 2 + (y[None, :, None] - py) ** 2 < papillary_radius**2
        box_signal[lv & muscle] = s["myocardium"]

    # Most basal slice only: a bright unlabelled atrium/outflow tract breaks the myocardial ring.
    outflow_angle, outflow_size = (float(f) for f in a.outflow)
    blob_radius = outflow_size * v.lv_radius
    blob_distance = v.lv_radius + 0.5 * v.wall + 0.5 * blob_radius
    ox = centre[..., 0] + blob_distance * np.cos(outflow_angle + rv_direction)
    oy = centre[..., 1] + blob_distance * np.sin(outflow_angle + rv_direction)
    outflow = (x[None, None, :] - ox) ** 2 + (y[None, :, None] - oy) ** 2 < blob_radius**2
    outflow &= (t < 0.5 / (a.shape[0] - 1)) & ~lv & ~rv_blood
    box_signal[outflow] = s["blood"]
    box_labels[outflow] = 0
    return signal, labels


def _appearance(signal: np.ndarray, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """MR appearance of a (Z, H, W) noise-free signal: gamma, texture, blur, bias field, noise.

    Returns:
      (Z, H, W) int16 magnitude image.
    """
    a = anatomy
    num_slices, height, width = signal.shape
    gamma = float(a.gamma)
    image = signal**gamma
    texture = ndimage.gaussian_filter(
        rng.standard_normal(signal.shape, np.float32), (0, 2, 2), truncate=2.0
    )
    image *= 1.0 + 0.25 * texture  # the filtered field has a standard deviation of ~0.14
    image = ndimage.gaussian_filter(image, (0, a.blur_sigma, a.blur_sigma))
    v = np.linspace(-1.0, 1.0, height, dtype=np.float32)[None, :, None]
    u = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, None, :]
    t = np.linspace(0.0, 1.0, num_slices, dtype=np.float32)[:, None, None]
    cu, cv, cuu, cvv, cuv, ct = (float(c) for c in a.bias)
    image *= np.exp(cu * u + cv * v + cuu * u**2 + cvv * v**2 + cuv * u * v + ct * t)
    blood = a.signal["blood"] ** gamma
    sigma = a.noise_level * blood
    real = image + sigma * rng.standard_normal(image.shape, np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, np.float32)
    magnitude = np.hypot(real, imaginary) * (a.max_value / blood)
    return np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16)


def synthesize_subject(seed: int, subject_index: int) -> SyntheticSubject:
    """Generates one subject in memory; depends only on (seed, subject_index).

    Args:
      seed: non-negative dataset seed.
      subject_index: non-negative subject number; its group is GROUPS[subject_index % 5].

    Returns:
      The subject's ED and ES images and labels, spacing and Info.cfg entries.
    """
    if seed < 0 or subject_index < 0:
        raise ValueError(
            f"seed={seed} and subject_index={subject_index} must be non-negative integers."
        )
    anatomy_seq, ed_seq, es_seq = np.random.SeedSequence([seed, subject_index]).spawn(3)
    rng = np.random.default_rng(anatomy_seq)
    group = GROUPS[subject_index % len(GROUPS)]
    anatomy = _sample_anatomy(rng, group)
    num_frames = int(rng.integers(25, 36))
    es_frame = int(rng.integers(9, 16))
    info = {
        "ED": str(ED_FRAME),
        "ES": str(es_frame),
        "Group": group,
        "Height": f"{rng.uniform(150, 195):.1f}",
        "NbFrame": str(num_frames),
        "Weight": f"{rng.uniform(50, 110):.1f}",
    }
    num_slices = anatomy.shape[0]
    slice_depths = np.arange(num_slices) / (num_slices - 1)
    # Each slice averages the anatomy across its thickness (through-plane partial volume).
    depths = (slice_depths[:, None] + np.array(_SUBDEPTHS) / (num_slices - 1)).ravel()
    centre = _SUBDEPTHS.index(0.0)
    background = _background(anatomy)
    images, labels = {}, {}
    for frame, phase, noise_seq in ((ED_FRAME, "ED", ed_seq), (es_frame, "ES", es_seq)):
        signal, label = _render(anatomy, phase, depths, background)
        signal = signal.reshape(num_slices, len(_SUBDEPTHS), *signal.shape[1:]).mean(axis=1)
        labels[frame] = label.reshape(num_slices, len(_SUBDEPTHS), *label.shape[1:])[:, centre]
        images[frame] = _appearance(signal, anatomy, np.random.default_rng(noise_seq))
    return SyntheticSubject(
        subject_id=f"{subject_index:03d}",
        group=group,
        images=images,
        labels=labels,
        spacing=anatomy.spacing,
        es_frame=es_frame,
        info=info,
    )


def _affine(spacing: Sequence[float], shape: Sequence[int]) -> np.ndarray:
    """Diagonal (4, 4) voxel-to-mm affine with the volume centred on the origin."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -0.5 * (np.asarray(shape) - 1) * np.asarray(spacing)
    return affine


def _write_subject(subject: SyntheticSubject, out_dir: str) -> str:
    """Writes one subject into a hidden temporary folder, then renames it into place."""
    name = f"patient{subject.subject_id}"
    final_dir = os.path.join(out_dir, name)
    temp_dir = tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir)
    try:
        os.chmod(temp_dir, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared.
        for frame in sorted(subject.images):
            # (Z, H, W) -> NIfTI (X, Y, Z) = (row, column, slice).
            image = np.transpose(subject.images[frame], (1, 2, 0))
            affine = _affine(subject.spacing, image.shape)
            for suffix, array in (
                ("", image),
                ("_gt", np.transpose(subject.labels[frame], (1, 2, 0))),
            ):
                nifti = nib.Nifti1Image(array, affine)
                nifti.header.set_xyzt_units("mm")
                nib.save(nifti, os.path.join(temp_dir, f"{name}_frame{frame:02d}{suffix}.nii.gz"))
        with open(os.path.join(temp_dir, "Info.cfg"), "w", encoding="utf-8") as f:
            f.writelines(f"{key}: {value}\n" for key, value in subject.info.items())
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        os.rename(temp_dir, final_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return final_dir


def generate(out_dir: str, num_subjects: int = 60, seed: int = 0) -> list[str]:
    """Writes the synthetic dataset in the ACDC layout.

    out_dir/patientXXX/ holds patientXXX_frame01.nii.gz (ED), patientXXX_frameYY.nii.gz (ES), their
    _gt label files and Info.cfg ("ED: 1", "ES: YY", "Group: ...", "Height", "NbFrame", "Weight").
    Each subject is written into a hidden temporary folder and renamed into place once complete,
    so an interrupted run never leaves a partial patientXXX folder. Existing folders with the same
    ids are replaced; other folders in out_dir are left alone.

    Args:
      out_dir: dataset root, created if missing.
      num_subjects: number of subjects, ids 000 .. num_subjects-1 (the paper splits use 60).
      seed: non-negative dataset seed.

    Returns:
      The subject folders, sorted.
    """
    if num_subjects < 1 or num_subjects > 1000:
        raise ValueError(f"num_subjects={num_subjects} must be in 1..1000 (ids are 3 digits).")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer.")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} is a file; pass a folder for the dataset.")
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    subject_dirs = []
    for index in range(num_subjects):
        subject_dirs.append(_write_subject(synthesize_subject(seed, index), out_dir))
        logging.info(
            "synthetic: wrote %s (%d/%d, %.1f s)",
            subject_dirs[-1],
            index + 1,
            num_subjects,
            time.perf_counter() - start,
        )
    return subject_dirs


def _overlay(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 4) RGBA overlay: RV blue, Myo green, LV red, half transparent."""
    colours = np.array(
        [[0, 0, 0, 0], [0.2, 0.4, 1.0, 0.4], [0.1, 0.9, 0.2, 0.4], [1.0, 0.15, 0.1, 0.4]]
    )
    return colours[labels]


def save_montage(
    subject_dirs: Sequence[str], path: str, max_subjects: int = 4, crop_mm: float = 150.0
) -> None:
    """Saves a PNG with one row per subject: the whole mid-ventricular ED slice, then every ED
    slice base -> apex cropped around the heart (crop_mm square) with the labels overlaid.

    Args:
      subject_dirs: patientXXX folders written by generate (the first max_subjects are shown).
      path: output PNG path.
      max_subjects: number of rows.
      crop_mm: side of the square shown around the heart.
    """
    from matplotlib.figure import Figure  # Figure + savefig needs no pyplot or global backend.
    from matplotlib.patches import Rectangle

    rows = []
    for subject_dir in list(subject_dirs)[:max_subjects]:
        name = os.path.basename(os.path.normpath(subject_dir))
        stem = os.path.join(subject_dir, f"{name}_frame{ED_FRAME:02d}")
        image_file = nib.load(f"{stem}.nii.gz")
        image = np.asarray(image_file.dataobj, np.float32)
        labels = np.asarray(nib.load(f"{stem}_gt.nii.gz").dataobj, np.uint8)
        with open(os.path.join(subject_dir, "Info.cfg"), encoding="utf-8") as f:
            group = dict(line.split(": ", 1) for line in f.read().splitlines())["Group"]
        rows.append((f"{name} {group}", image, labels, image_file.header.get_zooms()[:2]))
    if not rows:
        raise ValueError("save_montage needs at least one subject folder.")
    num_columns = 1 + max(image.shape[2] for _, image, _, _ in rows)
    figure = Figure(figsize=(1.5 * num_columns, 1.6 * len(rows)), facecolor="black")
    axes = figure.subplots(len(rows), num_columns, squeeze=False)
    for row, (title, image, labels, spacing) in zip(axes, rows, strict=True):
        low, high = np.percentile(image, [1, 99.5])
        centre = np.round(np.mean(np.nonzero(labels)[:2], axis=1)).astype(int)
        half = np.round(crop_mm / 2 / np.asarray(spacing)).astype(int)
        lo = np.clip(centre - half, 0, None)
        hi = np.minimum(centre + half, image.shape[:2])
        for ax in row:
            ax.set_axis_off()
        row[0].imshow(image[:, :, image.shape[2] // 2], cmap="gray", vmin=low, vmax=high)
        row[0].add_patch(
            Rectangle((lo[1], lo[0]), hi[1] - lo[1], hi[0] - lo[0], fill=False, color="yellow")
        )
        row[0].set_title(title, color="white", fontsize=8)
        for z, ax in enumerate(row[1 : image.shape[2] + 1]):
            crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), z)
            ax.imshow(image[crop], cmap="gray", vmin=low, vmax=high)
            ax.imshow(_overlay(labels[crop]))
            ax.set_title(f"z={z}", color="white", fontsize=7)
    figure.subplots_adjust(left=0.005, right=0.995, bottom=0.01, top=0.95, wspace=0.03, hspace=0.15)
    figure.savefig(path, dpi=100, facecolor="black")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--num-subjects", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--montage", help="optional PNG showing a few subjects with their labels")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    start = time.perf_counter()
    subject_dirs = generate(args.out, num_subjects=args.num_subjects, seed=args.seed)
    logging.info("synthetic: %d subjects in %.1f s", len(subject_dirs), time.perf_counter() - start)
    if args.montage:
        save_montage(subject_dirs, args.montage)
        logging.info("synthetic: montage written to %s", args.montage)


if __name__ == "__main__":
    main()
