"""Built-in synthetic short-axis cardiac cine-MRI dataset (SPEC §10), written in the ACDC layout.

Each subject comes from its own random stream derived from (seed, subject index), so subject k is
the same whatever the number of subjects. Its sampled anatomy (jaxcl.data.synthetic_anatomy) is
rendered here as a stack of 8-14 short-axis slices ordered base (z=0) -> apex at end-diastole
(frame 01) and end-systole (smaller cavities, thicker walls): the heart (ventricles, papillary
muscles, trabeculae, pericardial fat, basal outflow tract) is drawn in millimetres over the
background tissues, and each slice averages the scene across its thickness. Heart geometry is a
function of the relative depth t = z / (Z - 1), the same for every subject (what the G^D strategy
exploits). The slices then get an MR-like appearance: random gamma, texture, in-plane blur, a
smooth multiplicative bias field and Rician noise.

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

from jaxcl.data import synthetic_anatomy

ED_FRAME = 1
_SUBDEPTHS = (-1 / 3, 0.0, 1 / 3)  # through-plane samples per slice, in slice spacings


@dataclasses.dataclass(frozen=True)
class SyntheticSubject:
    """One generated subject in memory.

    Attributes:
      subject_id: "000".."999"; its folder is f"patient{subject_id}".
      group: one of synthetic_anatomy.GROUPS.
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


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _fourier(phi: np.ndarray, modes: np.ndarray, first: int) -> np.ndarray:
    """sum_k amplitude_k cos((first + k) phi - phase_k) for modes (K, 2) = (amplitude, phase)."""
    return sum(
        float(amplitude) * np.cos((first + k) * phi - float(phase))
        for k, (amplitude, phase) in enumerate(modes)
    )


def _render(
    anatomy: synthetic_anatomy.Anatomy,
    phase: str,
    depths: np.ndarray,
    background: synthetic_anatomy.Background,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free tissue signal and labels of the scene at the given relative depths.

    Args:
      anatomy: the subject.
      phase: "ED" or "ES".
      depths: (D,) relative depths, 0 the base, 1 the apical slice.
      background: synthetic_anatomy.draw_background(anatomy).

    Returns:
      signal (D, H, W) float32 and labels (D, H, W) uint8.
    """
    a, s = anatomy, anatomy.signal
    t = np.asarray(depths, np.float32)[:, None, None]
    liver = synthetic_anatomy.liver_mask(a, background, depths)
    signal = np.where(liver, np.float32(s["liver"]), background.signal)
    labels = np.zeros(signal.shape, np.uint8)

    # The heart, in polar coordinates about the LV centre (angles from the RV direction), is only
    # computed inside its bounding box; box_* are views into the full arrays.
    rows, cols = synthetic_anatomy.heart_box(a)
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
    heart_outer = np.where(has_rv, rv_outer + synthetic_anatomy.RV_WALL_MM, epi_radius)
    fat = np.clip(_fourier(phi, a.fat_profile, 1), 0.0, synthetic_anatomy.MAX_FAT_MM)
    heart_present = epi > 0

    # Layers: lung pushed back from the heart, pericardial fat, myocardium and unlabelled RV free
    # wall, blood pools; papillary muscles have the myocardial signal but belong to the LV label.
    lung_contact = heart_present & (radius < heart_outer + fat + 2.0)
    box_signal[lung_contact & background.lungs[rows, cols] & ~liver[:, rows, cols]] = s["soft"]
    box_signal[heart_present & (radius < heart_outer + fat)] = s["fat"]
    myocardium = radius < epi_radius
    lv = radius < endo_radius
    rv_blood = has_rv & ~myocardium & (radius < rv_outer)
    rv_wall = has_rv & ~myocardium & ~rv_blood & (radius < rv_outer + synthetic_anatomy.RV_WALL_MM)
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


def _appearance(
    signal: np.ndarray, anatomy: synthetic_anatomy.Anatomy, rng: np.random.Generator
) -> np.ndarray:
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
      subject_index: non-negative subject number; its group is
        synthetic_anatomy.GROUPS[subject_index % 5].

    Returns:
      The subject's ED and ES images and labels, spacing and Info.cfg entries.
    """
    if seed < 0 or subject_index < 0:
        raise ValueError(
            f"seed={seed} and subject_index={subject_index} must be non-negative integers."
        )
    anatomy_seq, ed_seq, es_seq = np.random.SeedSequence([seed, subject_index]).spawn(3)
    rng = np.random.default_rng(anatomy_seq)
    group = synthetic_anatomy.GROUPS[subject_index % len(synthetic_anatomy.GROUPS)]
    anatomy = synthetic_anatomy.sample_anatomy(rng, group)
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
    background = synthetic_anatomy.draw_background(anatomy)
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
