"""The data funnel beside the paper's (its numbers: paper_numbers.py's FUNNEL): WildChat-1M conversations
left after keeping English ones and after near-duplicate removal, the conversations per split and the
flipped samples per split, with ours - paper.

Ours come from data_prep's funnel.json (data_prep/funnel.py): `steps` in order, each with what it
removed, `kept` (conversations per split) and `examples` (flipped samples per split). "English" is
what is left after the `language` step, "after near-duplicate removal" what is left after the
`near_duplicate` step (every earlier step, the exact duplicates among them, counted in); a funnel
without such a step (PRISM's: no language filter) has no number there. `files` maps a result name to
its funnel.json; a name whose file does not exist is left out (the table shows the paper's numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.tables import Cell, Table, beside_paper
from evaluate.tables.paper_numbers import FUNNEL

COLUMNS = {  # column -> its key in FUNNEL
    "English": "english",
    "After near-duplicate removal": "after_near_duplicates",
    "Train conversations": "conversations.train",
    "Validation conversations": "conversations.validation",
    "Test conversations": "conversations.test",
    "Train samples": "samples.train",
    "Validation samples": "samples.validation",
    "Test samples": "samples.test",
}
LEFT_AFTER = {"english": "language", "after_near_duplicates": "near_duplicate"}   # key -> data_prep's step


def counts(funnel: dict, path: Path) -> dict[str, int]:
    """FUNNEL's keys for one funnel.json (a step or split it does not have: absent)."""
    for name in ("input", "steps", "kept", "examples"):
        if name not in funnel:
            raise ValueError(f"{path}: missing field {name!r} (not data_prep's funnel.json?)")
    found, left = {}, funnel["input"]
    for number, step in enumerate(funnel["steps"]):
        if "step" not in step or "removed" not in step:
            raise ValueError(f"{path}: steps[{number}] lacks 'step' or 'removed'")
        left -= step["removed"]
        found.update({key: left for key, name in LEFT_AFTER.items() if name == step["step"]})
    for split in ("train", "validation", "test"):
        if split in funnel["kept"]:
            found[f"conversations.{split}"] = funnel["kept"][split]
        if split in funnel["examples"]:
            found[f"samples.{split}"] = funnel["examples"][split]
    return found


def build(cfg) -> Table:
    files = {name: Path(path) for name, path in cfg.files.items() if Path(path).exists()}

    def ours(name: str) -> tuple[dict[str, Cell], str]:
        path = files[name]
        found = counts(json.loads(path.read_text()), path)
        return {column: Cell(ours=float(found[key]), source=str(path)) for column, key in COLUMNS.items()
                if key in found}, str(path)

    paper = {row: {column: float(numbers[key]) for column, key in COLUMNS.items()} for row, numbers in FUNNEL.items()}
    return beside_paper(
        cfg, "funnel", "Data funnel: conversations and flipped samples (counts)", COLUMNS, paper, list(files), ours,
        ["English: left after the language step; near-duplicate removal: left after data_prep's near_duplicate "
         "step (exact duplicates removed before it); samples: flipped examples per split (one per user turn "
         "plus one end-of-conversation sample in flip.mode=per_turn). The paper does not publish its "
         "near-duplicate method; ours is data_prep's (README, Data preparation)"],
        log_scale=True, number_format=",.0f", row_label="data")
