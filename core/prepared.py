"""Reading data_prep's output: the one reader of its examples and conversations, which every stage
uses, and which refuses an output that is not complete (no COMPLETED marker: a run still writing,
or killed) or a split that data_prep did not write (an empty split is counted in funnel.json but
not saved).
"""

from __future__ import annotations

from pathlib import Path

import datasets

from core.artifacts import is_complete


def check_prepared(data_dir: str | Path) -> Path:
    """`data_dir` as a Path, if it is a complete data_prep output."""
    data_dir = Path(data_dir)
    if not is_complete(data_dir):
        raise FileNotFoundError(f"{data_dir} is not a complete data_prep output (no COMPLETED marker): "
                                "run `python -m data_prep` first")
    return data_dir


def _load(data_dir: str | Path, relative: str, limit: int | None) -> datasets.Dataset:
    path = check_prepared(data_dir) / relative
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: data_prep wrote no such split (an empty split is not saved; "
                                f"see {Path(data_dir) / 'funnel.json'})")
    dataset = datasets.load_from_disk(str(path))
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def load_examples(data_dir: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """The tokenized examples of `split` (train/validation/test), the first `limit` if given."""
    return _load(data_dir, split, limit)


def load_conversations(data_dir: str | Path, split: str, limit: int | None = None) -> datasets.Dataset:
    """The conversations of `split` as text with their intents, the first `limit` if given."""
    return _load(data_dir, f"conversations/{split}", limit)
