"""Load the datasets a stage lists: resolve paths, import, validate, apply ``limit`` and ``category``,
and build `datasets.Dataset`s with the canonical features of align/data/schema.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, Optional, Sequence

from datasets import Dataset

from align.config import DatasetSpec
from align.data.importers import iter_records
from align.data.schema import FEATURES
from align.data.validate import DataError, DataReport, RowPolicy


def resolve_path(spec: DatasetSpec, data_dir: str | Path) -> Optional[Path]:
    """The file (or save_to_disk folder) a dataset reads: ``spec.path``, relative to ``data_dir`` unless absolute.

    None for synthetic_* (they read no file). A missing file is a `DataError` naming both.
    """
    if spec.format.startswith("synthetic"):
        return None
    given = Path(spec.path).expanduser()
    path = given if given.is_absolute() else Path(data_dir) / given
    if not path.exists():
        hint = (
            "; check the dataset's path"
            if given.is_absolute()
            else f" (path {spec.path!r} is relative to data_dir {str(data_dir)!r}: set the config's "
            f"data_dir key to the folder that holds it, or give an absolute path)"
        )
        raise DataError(f"data file {path} does not exist{hint}")
    if path.is_dir() and not is_saved_dataset(path):
        raise DataError(
            f"{path} is a directory, not a data file nor a datasets.save_to_disk folder (it has no "
            f"state.json or dataset_dict.json): point path at the file inside it"
        )
    return path


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by `datasets` ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def load_records(
    spec: DatasetSpec, kind: str, data_dir: str | Path, bad_rows: Literal["fail", "skip"] = "fail", seed: int = 0
) -> tuple[list[dict], DataReport]:
    """Import one dataset as canonical ``kind`` records, with the report of what was read and skipped.

    ``limit`` keeps a seeded random sample of that many valid records, in file order (the first N
    would take one end of a file that is sorted by topic or tree). ``category`` (preference only)
    replaces every pair's category, ``source`` every record's source.
    """
    if spec.category is not None and kind != "preference":
        raise DataError(
            f"dataset {spec.format} {spec.path!r}: category {spec.category!r} applies to "
            f"preference pairs only, and this stage reads {kind} records; remove it"
        )
    path = resolve_path(spec, data_dir)
    label = str(path) if path is not None else f"<{spec.format}>"
    report = DataReport(path=label, format=spec.format, kind=kind)
    records = [record for _, record in iter_records(spec, kind, path, RowPolicy(report, bad_rows), seed)]
    if spec.limit and len(records) > spec.limit:
        keep = sorted(random.Random(seed).sample(range(len(records)), spec.limit))
        records = [records[i] for i in keep]
    if spec.category is not None:
        for record in records:
            record["category"] = spec.category
    if spec.source:
        for record in records:
            record["source"] = spec.source
    report.n_kept = len(records)
    return records, report


def to_dataset(records: Sequence[dict], kind: str) -> Dataset:
    """Canonical records -> a `datasets.Dataset` with exactly the features ``FEATURES[kind]``."""
    features = FEATURES[kind]
    # from_dict with the columns spelled out also builds the empty dataset (from_list([]) cannot).
    return Dataset.from_dict({name: [record[name] for record in records] for name in features}, features=features)


def load_datasets(
    specs: Sequence[DatasetSpec],
    kind: str,
    data_dir: str | Path,
    bad_rows: Literal["fail", "skip"] = "fail",
    seed: int = 0,
) -> tuple[Dataset, list[DataReport]]:
    """Load several datasets and concatenate them, in the order listed; no specs -> an empty dataset."""
    records: list[dict] = []
    reports: list[DataReport] = []
    for spec in specs:
        part, report = load_records(spec, kind, data_dir, bad_rows, seed)
        records.extend(part)
        reports.append(report)
    return to_dataset(records, kind), reports
