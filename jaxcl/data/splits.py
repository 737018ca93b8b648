"""The paper's subject splits (docs/METHOD.md §10) and the synthetic dataset's (§12), as data.

Split names: "pretrain" (unlabelled pool for pre-training), "tr1"/"tr2"/"tr8" (labelled subsets of
1, 2 or 8 volumes, combinations "c1".."c5" for tr1/tr2 and "c1".."c3" for tr8; MM-WHS has only
"c1".."c4" for tr2, as in the original), "trall" (every labelled training volume, combination
"c1": the paper's full-label benchmark, docs/METHOD.md §10), "val" and "test".

Validation sets depend on the labelled set in the original code; `get_split(d, "val", "tr1-c2")`
returns the one that goes with labelled set tr1-c2, `get_split(d, "val")` the default. Like
every list here, the per-combination validation pairs of prostate and MM-WHS are taken from the
original code's data configuration. Their defaults are the pair used with c1 of every size:
prostate 013 014, MM-WHS 1002 1005.

Synthetic (docs/METHOD.md §12): pretrain 000-039, val 040-043, test 044-059; subject k belongs to
group k % 5 (0 NOR, 1 DCM, 2 HCM, 3 MINF, 4 RV). The labelled subsets are fixed lists built like
ACDC's: tr1 c1..c5 take one subject of each group (000 NOR, 011 DCM, 022 HCM, 033 MINF, 004 RV);
each tr2 combination pairs two of those five from different groups; each tr8 combination is those
five plus three more from different groups, so every group is represented.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping, Sequence

from jaxcl.data.sources import DataError, Subject

SPLIT_NAMES = ("pretrain", "tr1", "tr2", "tr8", "trall", "val", "test")
# The labelled set of every labelled training volume (the paper's benchmark), one combination.
ALL_LABELLED = "trall"


def _span(first: int, last: int, width: int = 3) -> tuple[str, ...]:
    """Zero-padded ids first..last inclusive."""
    return tuple(f"{i:0{width}d}" for i in range(first, last + 1))


@dataclasses.dataclass(frozen=True)
class Splits:
    """One dataset's subject splits: the paper's (below) or a folder's (`jaxcl.data.folder_splits`).

    Attributes:
      pretrain: unlabelled pre-training pool.
      test: test subjects.
      labelled: size ("tr1") -> combination ("c1") -> labelled subject ids.
      default_val: validation ids used when no labelled set is named, and for every labelled set
        not in `val_exceptions`; empty when the dataset has too few subjects for a validation
        set, in which case each labelled set is validated on its own subjects.
      val_exceptions: validation ids -> the labelled sets ("tr1-c2") that use them instead.
    """

    pretrain: tuple[str, ...]
    test: tuple[str, ...]
    labelled: Mapping[str, Mapping[str, tuple[str, ...]]]
    default_val: tuple[str, ...]
    val_exceptions: Mapping[tuple[str, ...], tuple[str, ...]] = dataclasses.field(
        default_factory=dict
    )

    def val(self, labelled_set: str) -> tuple[str, ...]:
        """Validation ids of a labelled set ("tr1-c2")."""
        for ids, labelled_sets in self.val_exceptions.items():
            if labelled_set in labelled_sets:
                return ids
        if self.default_val:
            return self.default_val
        size, _, combination = labelled_set.partition("-")
        return self.labelled[size][combination]

    def labelled_sets(self) -> tuple[str, ...]:
        return tuple(f"{size}-{c}" for size, combos in self.labelled.items() for c in combos)

    def combinations(self, name: str) -> tuple[str, ...]:
        """Valid `combination` values of split `name`: "c1".. for sizes, "tr1-c1".. for val."""
        if name == "val":
            return self.labelled_sets()
        if name in ("pretrain", "test"):
            return ()
        if name not in self.labelled:
            raise ValueError(
                f"unknown split name {name!r}; choose one of "
                f"{['pretrain', *self.labelled, 'val', 'test']}."
            )
        return tuple(self.labelled[name])

    def get(self, name: str, combination: str | None = None) -> list[str]:
        """Subject ids of one split (see `get_split`)."""
        valid = self.combinations(name)
        if name == "val" and combination is None:
            return list(self.default_val)
        if not valid and combination is not None:
            raise ValueError(f"split {name!r} takes no combination (got {combination!r}).")
        if valid and combination not in valid:
            raise ValueError(
                f"split {name!r} needs combination= one of {list(valid)} (got {combination!r})."
            )
        if name == "pretrain":
            return list(self.pretrain)
        if name == "test":
            return list(self.test)
        if name == "val":
            return list(self.val(combination))
        return list(self.labelled[name][combination])

    def to_dict(self, labelled_set: str | None = None) -> dict:
        """JSON-ready {"test", "val", "labelled": {size: {combination: ids}}, "pretrain"}.

        "val" is the validation set of `labelled_set` (default: the dataset's default).
        """
        val = self.val(labelled_set) if labelled_set else self.default_val
        return {
            "test": list(self.test),
            "val": list(val),
            "labelled": {
                size: {c: list(ids) for c, ids in combos.items()}
                for size, combos in self.labelled.items()
            },
            "pretrain": list(self.pretrain),
        }


def with_all_labelled(splits: Splits, labelled_ids: Iterable[str] | None = None) -> Splits:
    """`splits` plus the labelled set "trall": every labelled volume that is neither a test nor a
    default validation volume (`labelled_ids`: those with labels; None: all of the pre-training
    pool, as in the paper's datasets)."""
    held_out = set(splits.test) | set(splits.default_val)
    candidates = splits.pretrain if labelled_ids is None else sorted(labelled_ids)
    ids = tuple(i for i in candidates if i not in held_out)
    return dataclasses.replace(splits, labelled={**splits.labelled, ALL_LABELLED: {"c1": ids}})


_ACDC = Splits(
    pretrain=(
        _span(1, 6)
        + ("012",)
        + _span(17, 26)
        + _span(37, 46)
        + _span(57, 66)
        + ("072",)
        + _span(77, 86)
        + _span(97, 100)
    ),
    test=_span(7, 10) + _span(27, 30) + _span(47, 50) + _span(67, 70) + _span(87, 90),
    labelled={
        "tr1": {"c1": ("002",), "c2": ("042",), "c3": ("095",), "c4": ("022",), "c5": ("062",)},
        "tr2": {
            "c1": ("042", "062"),
            "c2": ("002", "042"),
            "c3": ("042", "095"),
            "c4": ("002", "022"),
            "c5": ("002", "095"),
        },
        "tr8": {
            "c1": ("002", "022", "042", "062", "095", "003", "023", "043"),
            "c2": ("002", "022", "042", "062", "095", "063", "094", "043"),
            "c3": ("002", "022", "042", "062", "095", "003", "094", "023"),
        },
    },
    default_val=("011", "071"),
    val_exceptions={("031", "072"): ("tr1-c2", "tr2-c1", "tr2-c3", "tr8-c2")},
)

_PROSTATE = Splits(
    pretrain=(
        "000",
        "001",
        "002",
        "004",
        "006",
        "007",
        "010",
        "013",
        "014",
        "016",
        "017",
        "018",
        "020",
        "021",
        "024",
        "025",
        "028",
    ),  # fmt: skip
    test=("029", "031", "032", "034", "035") + _span(37, 44) + ("046", "047"),
    labelled={
        "tr1": {"c1": ("001",), "c2": ("002",), "c3": ("006",), "c4": ("000",), "c5": ("004",)},
        "tr2": {
            "c1": ("000", "001"),
            "c2": ("021", "024"),
            "c3": ("001", "002"),
            "c4": ("004", "010"),
            "c5": ("000", "007"),
        },
        "tr8": {
            "c1": ("000", "001", "002", "004", "006", "007", "010", "016"),
            "c2": ("002", "004", "006", "007", "010", "016", "021", "018"),
            "c3": ("000", "001", "006", "007", "010", "017", "018", "024"),
        },
    },
    default_val=("013", "014"),
    val_exceptions={
        ("017", "020"): ("tr1-c2", "tr2-c2", "tr8-c2"),
        ("025", "028"): ("tr1-c3", "tr1-c5", "tr2-c3", "tr2-c5", "tr8-c3"),
    },
)

_MMWHS = Splits(
    pretrain=_span(1001, 1010, width=4),
    test=_span(1011, 1020, width=4),
    labelled={
        "tr1": {
            "c1": ("1003",),
            "c2": ("1006",),
            "c3": ("1008",),
            "c4": ("1001",),
            "c5": ("1009",),
        },
        "tr2": {
            "c1": ("1001", "1003"),
            "c2": ("1009", "1008"),
            "c3": ("1006", "1002"),
            "c4": ("1010", "1007"),
        },
        "tr8": {
            "c1": ("1001", "1003", "1004", "1006", "1007", "1008", "1009", "1010"),
            "c2": ("1002", "1003", "1004", "1005", "1006", "1007", "1009", "1010"),
            "c3": ("1001", "1003", "1004", "1005", "1006", "1008", "1009", "1010"),
        },
    },
    default_val=("1002", "1005"),
    val_exceptions={
        ("1001", "1008"): ("tr1-c2", "tr2-c3", "tr8-c2"),
        ("1002", "1007"): ("tr1-c3", "tr1-c5", "tr2-c2", "tr8-c3"),
        ("1004", "1008"): ("tr2-c4",),
    },
)

_SYNTHETIC = Splits(
    pretrain=_span(0, 39),
    test=_span(44, 59),
    labelled={
        "tr1": {"c1": ("000",), "c2": ("011",), "c3": ("022",), "c4": ("033",), "c5": ("004",)},
        "tr2": {
            "c1": ("000", "011"),
            "c2": ("022", "033"),
            "c3": ("004", "000"),
            "c4": ("011", "022"),
            "c5": ("033", "004"),
        },
        "tr8": {
            "c1": ("000", "011", "022", "033", "004", "001", "012", "023"),
            "c2": ("000", "011", "022", "033", "004", "005", "016", "027"),
            "c3": ("000", "011", "022", "033", "004", "034", "010", "021"),
        },
    },
    default_val=_span(40, 43),
    val_exceptions={},
)

_SPLITS: Mapping[str, Splits] = types.MappingProxyType(
    {
        name: with_all_labelled(splits)
        for name, splits in (
            ("acdc", _ACDC),
            ("prostate", _PROSTATE),
            ("mmwhs", _MMWHS),
            ("synthetic", _SYNTHETIC),
        )
    }
)


def paper_splits(dataset: str) -> Splits:
    """The paper's splits of "acdc", "prostate", "mmwhs" (or the built-in "synthetic" set)."""
    if dataset not in _SPLITS:
        raise ValueError(
            f"no paper splits for dataset {dataset!r}; choose one of {sorted(_SPLITS)} (the "
            "'folder' layout makes its splits from config.data.splits, docs/DATA.md)."
        )
    return _SPLITS[dataset]


def has_paper_splits(dataset: str) -> bool:
    return dataset in _SPLITS


def combinations(dataset: str, name: str) -> tuple[str, ...]:
    """Valid `combination` values of split `name`: "c1".. for tr*, "tr1-c1".. for val, () else."""
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split name {name!r}; choose one of {list(SPLIT_NAMES)}.")
    return paper_splits(dataset).combinations(name)


def get_split(dataset: str, name: str, combination: str | None = None) -> list[str]:
    """Subject ids of one of the paper's splits.

    Args:
      dataset: "acdc", "prostate", "mmwhs" or "synthetic".
      name: one of SPLIT_NAMES.
      combination: "c1".. for tr1/tr2/tr8 (required); for "val" optionally the labelled set it
        goes with ("tr1-c2"); None for pretrain/test.

    Returns:
      Subject ids (zero-padded strings, see jaxcl.data.sources).
    """
    if name not in SPLIT_NAMES:
        raise ValueError(f"unknown split name {name!r}; choose one of {list(SPLIT_NAMES)}.")
    try:
        return paper_splits(dataset).get(name, combination)
    except ValueError as error:
        if name == "pretrain" or "no paper splits" in str(error):
            raise
        raise ValueError(f"{dataset} {error}") from None


def check_split_on_disk(
    ids: Iterable[str], subjects: Sequence[Subject], *, require_labels: bool = False
) -> None:
    """Raises DataError naming the split ids with no subject on disk (or no label, if required)."""
    by_id = {s.subject_id: s for s in subjects}
    ids = list(ids)
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(
            f"split subjects {missing} are not in the dataset on disk (found {len(by_id)} "
            "subjects); check the dataset root and that the download is complete."
        )
    if require_labels:
        unlabelled = [i for i in ids if by_id[i].label_path is None]
        if unlabelled:
            raise DataError(
                f"split subjects {unlabelled} have no label file (e.g. next to "
                f"{by_id[unlabelled[0]].image_path}); these splits need labels, add them."
            )
