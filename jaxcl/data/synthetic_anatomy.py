"""Sampled anatomy of one synthetic cardiac subject (docs/METHOD.md §12): what lies where, in mm.

`sample_anatomy` draws everything random about a subject except its image noise: the image grid
and spacing, the heart's sizes at end-diastole and end-systole for its group (NOR, DCM, HCM, MINF,
RV), the heart's pose and outline, the body, liver, spine and aorta, and the tissue signals and
MR appearance parameters that jaxcl.data.synthetic applies. `draw_background` lays out the
depth-independent tissues (body fat, chest-wall muscle and ribs, lungs, spine and aorta, where the
liver grows in, trabeculation spots) with smoothly warped outlines, and `heart_box` bounds the
image region the heart can occupy. Pure numpy, no I/O.

Conventions: positions are in mm relative to the image centre, x towards the image right (array
columns, patient right -> left) and y towards the image bottom (array rows, anterior ->
posterior). Depth-dependent quantities use the relative depth t = z / (Z - 1), 0 at the base
slice and 1 at the apical slice.
"""

import dataclasses

import numpy as np
from scipy import ndimage

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")

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
# Per-subject factors on those signals: tissue contrast varies widely between subjects (as between
# scanners and protocols), but blood stays clearly brighter than myocardium, as in bSSFP cine.
_SIGNAL_JITTER = {"blood": (0.85, 1.15), "rv_blood": (0.85, 1.15), "myocardium": (0.7, 1.4)}
# Per group, end-diastolic ranges of: LV cavity radius and wall thickness at the base (mm), RV
# crescent depth (mm) and half-width (degrees), LV and RV ejection fractions.
_GROUP_RANGES = {
    "NOR": ((22, 27), (7, 10), (16, 24), (60, 80), (0.55, 0.7), (0.5, 0.6)),
    "DCM": ((31, 37), (5, 7), (16, 24), (60, 80), (0.1, 0.3), (0.35, 0.5)),
    "HCM": ((15, 20), (13, 19), (14, 20), (60, 80), (0.65, 0.8), (0.5, 0.6)),
    "MINF": ((26, 32), (7, 10), (16, 24), (60, 80), (0.25, 0.4), (0.4, 0.55)),
    "RV": ((21, 26), (7, 10), (28, 40), (75, 95), (0.5, 0.65), (0.15, 0.3)),
}
RV_WALL_MM = 3.0  # thickness of the unlabelled RV free wall, mm
MAX_FAT_MM = 6.0  # largest pericardial fat thickness around the heart, mm


@dataclasses.dataclass(frozen=True)
class Ventricles:
    """Heart sizes at one cardiac phase, at the base (t = 0).

    Attributes:
      lv_radius: LV cavity radius, mm.
      wall: LV myocardial wall thickness, mm.
      rv_depth: depth of the RV crescent beyond the LV epicardium, mm.
    """

    lv_radius: float
    wall: float
    rv_depth: float


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Everything random about one subject except its noise (lengths in mm, angles in radians).

    Positions are relative to the image centre, x to the image right, y to the image bottom.
    Depth-dependent quantities are given at the base and apex and interpolated linearly in t.
    The appearance fields (signal .. max_value) are drawn here too, from the same random stream,
    and applied by jaxcl.data.synthetic.
    """

    group: str
    shape: tuple[int, int, int]  # (Z, H, W)
    spacing: tuple[float, float, float]  # (row, column, slice)
    phases: dict[str, Ventricles]  # "ED", "ES"
    lv_centre: np.ndarray  # (2, 2): (base, apex) x (x, y)
    rv_angle: np.ndarray  # (2,): direction of the RV seen from the LV centre, base and apex
    rv_half_width: float  # angular half-width of the RV crescent
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
    signal: dict[str, float]  # tissue name -> relative signal (blood ~0.95, air 0)
    gamma: float  # contrast exponent applied to the signal
    bias: np.ndarray  # (6,): log-bias coefficients of x, y, x^2, y^2, xy, t (x, y in [-1, 1])
    blur_sigma: float  # in-plane partial-volume blur, pixels
    noise_level: float  # Rician sigma relative to the blood signal
    max_value: float  # blood intensity on disk


def sample_anatomy(rng: np.random.Generator, group: str) -> Anatomy:
    """Draws the geometry and appearance of one subject of the given group.

    Args:
      rng: the subject's random stream; the draws consume it in a fixed order.
      group: one of GROUPS; sets the heart's sizes and ejection fractions.

    Returns:
      The subject's anatomy: a (Z, H, W) grid of 8-14 slices of 200-260 x 200-260 pixels, pixel
      spacing 1.2-1.8 mm and slice spacing 5-10 mm.
    """
    if group not in _GROUP_RANGES:
        raise ValueError(f"group={group!r} is not a synthetic subject group; use one of {GROUPS}.")
    u = rng.uniform
    num_slices = int(rng.integers(8, 15))
    # Stacks cover 60-110 mm from base to apex, as clinical short-axis stacks do.
    slice_mm = u(max(5.0, 60.0 / (num_slices - 1)), min(10.0, 110.0 / (num_slices - 1)))
    height, width = (int(n) for n in rng.integers(200, 261, size=2))
    # A 280-380 mm field of view, within the 1.2-1.8 mm pixel range.
    pixel_mm = u(max(1.2, 280.0 / max(height, width)), min(1.8, 380.0 / max(height, width)))

    lv_range, wall_range, rv_range, rv_width, lv_ef, rv_ef = _GROUP_RANGES[group]
    scale = u(0.9, 1.1)
    ed = Ventricles(u(*lv_range) * scale, u(*wall_range) * scale, u(*rv_range) * scale)
    # End-systole: the cavity area shrinks by the ejection fraction, the myocardial area is kept.
    es_radius = ed.lv_radius * np.sqrt(1.0 - u(*lv_ef))
    es_outer = np.sqrt((ed.lv_radius + ed.wall) ** 2 - ed.lv_radius**2 + es_radius**2)
    es = Ventricles(es_radius, es_outer - es_radius, ed.rv_depth * (1.0 - u(*rv_ef)) ** 0.7)

    body = np.array([u(-10, 10), u(0, 20), np.deg2rad(u(-8, 8)), u(150, 190), u(100, 125)])
    body = np.concatenate([body, [u(8, 25), u(8, 16), u(10, 25)]])
    inner_depth = body[4] - body[5] - body[6] - body[7]
    # The heart sits anterior in the thorax, left of the midline (image right).
    rotation = np.array([[np.cos(body[2]), -np.sin(body[2])], [np.sin(body[2]), np.cos(body[2])]])
    base_centre = body[:2] + rotation @ [u(5, 30), -inner_depth * u(0.15, 0.35)]
    rv_angle = np.pi + 0.25 + np.deg2rad(u(-30, 30))
    infarct_depths = sorted(u(0.0, 1.0, size=2) * [0.5, 1.0])
    fat_amplitude = u(0.5, 2.5, size=4) / np.arange(1, 5)
    return Anatomy(
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
        signal={
            name: value * u(*_SIGNAL_JITTER.get(name, (0.6, 1.5)))
            for name, value in _TISSUE_SIGNAL.items()
        },
        gamma=u(0.6, 1.8),
        bias=rng.normal(0.0, 0.3, size=6) + [0.0, -0.25, 0.0, 0.0, 0.0, 0.0],
        blur_sigma=u(0.6, 1.6),
        noise_level=u(0.02, 0.10),
        max_value=u(300, 1500),
    )


@dataclasses.dataclass(frozen=True)
class Background:
    """The depth-independent part of one subject's scene, (H, W) arrays on the image grid.

    Attributes:
      signal: float32 tissue signal of body, chest wall and ribs, lungs, spine and aorta.
      lungs: bool lung mask.
      liver_extent: float32 normalised distance from the liver centre; `liver_mask` turns it into
        the liver at a given depth (inf where the liver never reaches).
      trabeculae: bool spots where blood next to the ventricular walls shows muscle bundles.
    """

    signal: np.ndarray
    lungs: np.ndarray
    liver_extent: np.ndarray
    trabeculae: np.ndarray


def draw_background(anatomy: Anatomy) -> Background:
    """Draws the depth-independent part of the scene; depends only on the anatomy.

    Args:
      anatomy: the subject; its texture_seed seeds the outline warps, ribs and textures.

    Returns:
      The (H, W) background of the subject's image grid.
    """
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
    return Background(
        signal=signal,
        lungs=lungs,
        liver_extent=liver_extent.astype(np.float32),
        trabeculae=trabeculae > 1.6 * trabeculae.std(),
    )


def liver_mask(anatomy: Anatomy, background: Background, depths: np.ndarray) -> np.ndarray:
    """Where the liver is at the given depths: it shows in apical slices and grows towards the apex.

    Args:
      anatomy: the subject.
      background: draw_background(anatomy).
      depths: (D,) relative depths, 0 the base, 1 the apical slice.

    Returns:
      (D, H, W) bool liver mask.
    """
    t = np.asarray(depths, np.float32)[:, None, None]
    liver_start = float(anatomy.liver[0])
    liver_growth = np.clip((t - liver_start) / (1.15 - liver_start), 0.0, 1.0) ** 1.2
    return background.liver_extent < liver_growth


def heart_box(anatomy: Anatomy) -> tuple[slice, slice]:
    """Rows and columns of the image that can contain the heart or its pericardial fat.

    Args:
      anatomy: the subject.

    Returns:
      (row slice, column slice) of the (H, W) image grid, the same at every depth and phase.
    """
    a = anatomy
    reach = (
        max(
            v.lv_radius * (1 + a.lv_shape[:, 0].sum()) + v.wall * (1 + a.septal_bulge) + v.rv_depth
            for v in a.phases.values()
        )
        + RV_WALL_MM
        + MAX_FAT_MM
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
