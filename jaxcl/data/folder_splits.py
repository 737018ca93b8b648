"""Subject splits of a user's own dataset (the "folder" layout), explicit or automatic.

A folder dataset has no paper splits, so they come from `config.data.splits` (docs/DATA.md):

  explicit   `test`, `val`, `labelled` and `pretrain` name the case ids (comma-separated;
             `labelled` as "tr1-c1=case_a; tr2-c1=case_a,case_b"), or `file` names a
             splits.json written by an earlier run (WORKDIR/splits.json). Any key left empty is
             filled automatically from the remaining cases.
  automatic  deterministic from the seed and the sorted case ids: a shuffled order of the
             labelled cases gives the test cases (`test_fraction`, at least one), then `num_val`
             validation cases, and the rest is the pool of the labelled sets: for each size in
             `labelled_sizes` (capped by the pool) up to `combinations_per_size` distinct subsets.

The pre-training pool is every image that is not a test case: the labelled cases with their
labels ignored, the unlabelled ones (imagesTs/, `config.data.unlabelled_roots`). With only two
labelled cases one trains and one tests; validation then reuses the training case, and a note
says so. Labelled sets are named by their size as in the paper ("tr2" holds 2 cases).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from jaxcl import files
from jaxcl.data.sources import DataError, Subject
from jaxcl.data.splits import ALL_LABELLED, Splits, with_all_labelled

# Enumerate every subset below this many to draw distinct ones; sample above it.
_ENUMERATION_LIMIT = 10_000


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """`config.data.splits`, parsed: fixed ids (None: automatic) and the automatic settings."""

    test: tuple[str, ...] | None = None
    val: tuple[str, ...] | None = None
    labelled: Mapping[str, Mapping[str, tuple[str, ...]]] | None = None
    pretrain: tuple[str, ...] | None = None
    labelled_sizes: tuple[int, ...] = (1, 2, 8)
    combinations_per_size: int = 3
    test_fraction: float = 0.2
    num_val: int = 2


def _ids(value: str | Sequence[str], key: str) -> tuple[str, ...] | None:
    """Comma-separated (or listed) ids; None when empty."""
    items = value.split(",") if isinstance(value, str) else list(value)
    ids = tuple(str(item).strip() for item in items if str(item).strip())
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"config.data.splits.{key} lists {duplicates} more than once.")
    return ids or None


def parse_labelled(value: str | Mapping, key: str = "labelled") -> dict | None:
    """Labelled sets "tr1-c1=a; tr2-c1=a,b" or {"tr1": {"c1": ["a"]}} -> {"tr1": {"c1": ("a",)}}.

    None when empty.

    Raises:
      DataError for a malformed entry or a set whose name does not give its size.
    """
    if isinstance(value, str):
        entries = [entry.strip() for entry in value.split(";") if entry.strip()]
        pairs = []
        for entry in entries:
            name, equals, ids = entry.partition("=")
            if not equals or "-" not in name:
                raise DataError(
                    f"config.data.splits.{key}: {entry!r} is not 'trN-cK=id,id'; write e.g. "
                    "'tr1-c1=case_003; tr2-c1=case_003,case_007'."
                )
            size, _, combination = name.strip().partition("-")
            pairs.append((size, combination, _ids(ids, key) or ()))
    else:
        pairs = [
            (size, combination, _ids(ids, key) or ())
            for size, combos in value.items()
            for combination, ids in combos.items()
        ]
    labelled: dict[str, dict[str, tuple[str, ...]]] = {}
    for size, combination, ids in pairs:
        if size == ALL_LABELLED:  # every labelled training case, whatever their number
            labelled.setdefault(size, {})[combination] = ids
            continue
        match = re.fullmatch(r"tr(\d+)", size)
        if not match or not re.fullmatch(r"c\d+", combination):
            raise DataError(
                f"config.data.splits.{key}: labelled set {size}-{combination} must be named "
                "trN-cK (N its number of cases, K its index), e.g. tr2-c1."
            )
        if int(match.group(1)) != len(ids):
            raise DataError(
                f"config.data.splits.{key}: {size}-{combination} lists {len(ids)} cases {ids}; "
                f"a set named {size} holds {match.group(1)} (rename it tr{len(ids)})."
            )
        labelled.setdefault(size, {})[combination] = ids
    return {size: labelled[size] for size in sorted(labelled, key=_size_order)} or None


def _size_order(name: str) -> float:
    """ "tr2" -> 2; "trall" last."""
    return math.inf if name == ALL_LABELLED else int(name[2:])


def _read_file(path: str) -> dict:
    try:
        values = json.loads(files.path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"config.data.splits.file={path!r} does not exist; give a splits.json written by "
            "an earlier run (WORKDIR/splits.json) or leave it empty for automatic splits."
        ) from None
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"config.data.splits.file={path!r} is not valid JSON ({error}).") from None
    if not isinstance(values, dict) or not {"test", "labelled"} <= set(values):
        raise DataError(
            f'config.data.splits.file={path!r} needs at least "test" and "labelled" entries '
            "(the form of WORKDIR/splits.json)."
        )
    return values


def settings_from_config(splits: ml_collections.ConfigDict) -> SplitSettings:
    """Parses `config.data.splits`; the file (if any) wins over the id keys."""
    values = {key: splits[key] for key in ("test", "val", "labelled", "pretrain")}
    if splits.file:
        values.update(
            {k: v for k, v in _read_file(splits.file).items() if k in values and v is not None}
        )
    try:
        sizes = tuple(int(s) for s in str(splits.labelled_sizes).split(",") if s.strip())
    except ValueError:
        raise DataError(
            f"config.data.splits.labelled_sizes={splits.labelled_sizes!r} must list integers, "
            "e.g. '1,2,8'."
        ) from None
    if not sizes or min(sizes) < 1:
        raise DataError(
            f"config.data.splits.labelled_sizes={splits.labelled_sizes!r} must list positive "
            "sizes, e.g. '1,2,8'."
        )
    if not 0 < splits.test_fraction < 1:
        raise DataError(
            f"config.data.splits.test_fraction={splits.test_fraction!r} must be in (0, 1), "
            "e.g. 0.2."
        )
    for key in ("num_val", "combinations_per_size"):
        minimum = 0 if key == "num_val" else 1
        if not isinstance(splits[key], int) or splits[key] < minimum:
            raise DataError(
                f"config.data.splits.{key}={splits[key]!r} must be an integer >= {minimum}."
            )
    return SplitSettings(
        test=_ids(values["test"], "test"),
        val=_ids(values["val"], "val"),
        labelled=parse_labelled(values["labelled"]) if values["labelled"] else None,
        pretrain=_ids(values["pretrain"], "pretrain"),
        labelled_sizes=tuple(sorted(set(sizes))),
        combinations_per_size=splits.combinations_per_size,
        test_fraction=float(splits.test_fraction),
        num_val=splits.num_val,
    )


def _subsets(pool: Sequence[str], size: int, count: int, rng: np.random.Generator) -> list:
    """Up to `count` distinct sorted subsets of `size` cases of `pool`, in drawing order."""
    total = math.comb(len(pool), size)
    count = min(count, total)
    if total <= _ENUMERATION_LIMIT:
        every = list(itertools.combinations(pool, size))
        return [every[i] for i in rng.choice(total, count, replace=False)]
    chosen: list[tuple[str, ...]] = []
    while len(chosen) < count:
        subset = tuple(sorted(rng.choice(pool, size, replace=False).tolist()))
        if subset not in chosen:
            chosen.append(subset)
    return chosen


def _check_known(ids: Sequence[str], known: set[str], what: str, hint: str) -> None:
    unknown = sorted(set(ids) - known)
    if unknown:
        raise DataError(f"{what} {unknown} are not {hint}; check config.data.splits.")


def make_splits(
    subjects: Sequence[Subject], settings: SplitSettings, *, seed: int
) -> tuple[Splits, list[str]]:
    """The splits of a folder dataset and what to tell the user (see the module docstring).

    Args:
      subjects: every case found (labelled ones have a label_path).
      settings: `settings_from_config(config.data.splits)`.
      seed: `config.seed`; the automatic parts depend only on it and the sorted case ids.

    Returns:
      (splits, notes, warnings): notes say what was chosen automatically, warnings name the
      compromises a small dataset forces (no independent validation set, capped sizes).

    Raises:
      DataError: fewer than 2 labelled cases, unknown or unlabelled ids, overlaps.
    """
    labelled_ids = sorted(s.subject_id for s in subjects if s.label_path is not None)
    all_ids = sorted(s.subject_id for s in subjects)
    if len(labelled_ids) < 2:
        raise DataError(
            f"the dataset has {len(labelled_ids)} labelled case(s); at least 2 are needed (one to "
            "train on, one to test), add label files to labelsTr/."
        )
    labelled_known = set(labelled_ids)
    hint = "labelled cases of the dataset (imagesTr/ with a labelsTr/ file)"
    rng = np.random.default_rng(seed)
    order = [labelled_ids[i] for i in rng.permutation(len(labelled_ids))]
    notes, warnings = [], []

    fixed_sets = [ids for combos in (settings.labelled or {}).values() for ids in combos.values()]
    fixed_train = {i for ids in fixed_sets for i in ids}
    if settings.test is not None:
        test = settings.test
        _check_known(test, labelled_known, "test cases", hint)
    else:
        candidates = [i for i in order if i not in fixed_train and i not in (settings.val or ())]
        wanted = min(max(1, round(settings.test_fraction * len(labelled_ids))), len(candidates))
        if len(labelled_ids) - wanted < 1:
            wanted = len(labelled_ids) - 1
        test = tuple(sorted(candidates[:wanted]))
        notes.append(
            f"test: {len(test)} of {len(labelled_ids)} labelled cases "
            f"(test_fraction={settings.test_fraction:g}, drawn with seed {seed})"
        )
    if not test:
        raise DataError("no test case is left; list one in config.data.splits.test.")
    remaining = [i for i in order if i not in test]
    if not remaining:
        raise DataError(
            f"every labelled case is a test case ({list(test)}); leave at least one to train on."
        )

    if settings.val is not None:
        val = settings.val
        _check_known(val, labelled_known, "validation cases", hint)
    else:
        candidates = [i for i in remaining if i not in fixed_train]
        count = min(settings.num_val, max(0, len(candidates) - (0 if fixed_sets else 1)))
        val = tuple(sorted(candidates[:count]))
        if count < settings.num_val:
            reuse = "; each labelled set is validated on its training cases" if not count else ""
            warnings.append(
                f"val: only {count} validation case(s) (num_val={settings.num_val}) leave a case "
                f"to train on{reuse}; add labelled cases for an independent validation set"
            )
    if overlap := sorted(set(val) & set(test)):
        raise DataError(f"cases {overlap} are both validation and test cases; list each in one.")

    if settings.labelled is not None:
        labelled = settings.labelled
        for ids in fixed_sets:
            _check_known(ids, labelled_known, "labelled-set cases", hint)
            if overlap := sorted(set(ids) & set(test)):
                raise DataError(
                    f"labelled-set cases {overlap} are also test cases; a model must not train on "
                    "its test cases."
                )
    else:
        pool = sorted(i for i in remaining if i not in val)
        labelled = {}
        for size in sorted({min(size, len(pool)) for size in settings.labelled_sizes}):
            subsets = _subsets(pool, size, settings.combinations_per_size, rng)
            labelled[f"tr{size}"] = {f"c{k + 1}": s for k, s in enumerate(subsets)}
        capped = [size for size in settings.labelled_sizes if size > len(pool)]
        if capped:
            warnings.append(
                f"labelled sets: sizes {capped} capped at the {len(pool)} cases left for training"
            )
        notes.append(
            "labelled sets: "
            + ", ".join(f"{size} x{len(combos)}" for size, combos in labelled.items())
            + " (trN: N cases; xK: K subsets)"
            + f" from {len(pool)} training cases (drawn with seed {seed})"
        )

    if settings.pretrain is not None:
        pretrain = settings.pretrain
        _check_known(pretrain, set(all_ids), "pre-training cases", "cases of the dataset")
        if overlap := sorted(set(pretrain) & set(test)):
            raise DataError(f"pre-training cases {overlap} are also test cases; remove them.")
    else:
        pretrain = tuple(i for i in all_ids if i not in test)
    labelled = {size: dict(combos) for size, combos in labelled.items() if size != ALL_LABELLED}
    splits = Splits(
        pretrain=tuple(pretrain),
        test=tuple(test),
        labelled=labelled,
        default_val=tuple(val),
    )
    return with_all_labelled(splits, labelled_known), notes, warnings
