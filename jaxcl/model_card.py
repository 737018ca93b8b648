"""What a fine-tuned model needs to segment a new scan, stored beside its weights.

The fine-tuning stage writes `WORKDIR/finetune/export/` (the variables, via orbax) and, into the
same folder, `jaxcl_model.json`: the preprocessing settings (in-plane resolution, crop size, slice
axis, N4), the image channel and channel count, the class names and their raw label values, the
UNet's settings, and the dataset, labelled set and git commit it came from. With the two, an
export is self-contained: `python -m jaxcl.predict --model=EXPORT` and the evaluate stage need
nothing else to preprocess a new volume, run the network and write raw label values.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from etils import epath

from jaxcl import files

CARD_FILE = "jaxcl_model.json"
FORMAT_VERSION = 1


class ModelCardError(ValueError):
    """A model folder without a readable card; the message names the folder and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelCard:
    """A fine-tuned model's description (see the module docstring).

    Attributes:
      target_resolution: in-plane voxel size in mm the network sees.
      image_size: in-plane size S after centre crop / pad.
      slice_axis: "sagittal", "coronal" or "axial" (RAS axis the slices are taken along).
      n4: whether N4 bias correction ran before normalisation.
      channel: image channel used from multi-channel (4D) data, None for single-channel data.
      num_channels: channels of the training images (1 for 3D images).
      class_names: (C,) class names, index 0 background.
      label_values: (C,) raw label value written for each class index.
      filters: UNet filters per level.
      dtype: compute dtype ("float32" or "bfloat16").
      dataset: layout name of the training data ("folder", "acdc", ...).
      labelled_set: the labelled subset fine-tuned on ("tr1-c1"), "" if unknown.
      git_commit: jaxcl commit that trained it.
    """

    target_resolution: float
    image_size: int
    slice_axis: str
    n4: bool
    channel: int | None
    num_channels: int
    class_names: tuple[str, ...]
    label_values: tuple[int, ...]
    filters: tuple[int, ...]
    dtype: str
    dataset: str
    labelled_set: str
    git_commit: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocessing(self) -> dict[str, Any]:
        """The settings `preprocess.preprocess_image` (and `tfds.load_volumes`) take."""
        return {
            "target_resolution": self.target_resolution,
            "image_size": self.image_size,
            "slice_axis": self.slice_axis,
            "n4": self.n4,
        }

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}, indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelCard:
        names = {field.name for field in dataclasses.fields(cls)}
        missing = sorted(names - set(values))
        if missing:
            raise ModelCardError(f"the model card lacks {missing}")
        kwargs = {name: values[name] for name in names}
        for name in ("class_names", "label_values", "filters"):
            kwargs[name] = tuple(kwargs[name])
        return cls(**kwargs)


def write(export_dir: files.PathLike, card: ModelCard) -> None:
    """Writes `card` into an export folder (atomically)."""
    files.write_atomically(files.path(export_dir) / CARD_FILE, card.to_json())


def find_export(model: files.PathLike) -> epath.Path:
    """The export folder `model` names: an export itself, or a workdir (its fine-tuned model).

    Raises:
      ModelCardError: naming the folder and what to pass instead.
    """
    folder = files.path(model)
    for candidate in (folder, folder / "finetune" / "export"):
        if (candidate / CARD_FILE).exists():
            return candidate
    raise ModelCardError(
        f"{folder} is not a jaxcl model: neither it nor {folder / 'finetune' / 'export'} holds "
        f"{CARD_FILE}; pass a workdir whose finetune stage has finished, or its finetune/export "
        "folder (models exported before jaxcl wrote model cards must be fine-tuned again)."
    )


def read(export_dir: files.PathLike) -> ModelCard:
    """The card of an export folder (see `find_export`)."""
    path = files.path(export_dir) / CARD_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelCardError(
            f"{path} is unreadable ({error}); fine-tune the model again."
        ) from None
    try:
        return ModelCard.from_dict(values)
    except (ModelCardError, TypeError) as error:
        raise ModelCardError(f"{path}: {error}; fine-tune the model again.") from None
