"""The paper's extrinsic-evaluation table (Table 3) beside ours; its numbers: paper_numbers.py's EXTRINSIC.

Rows: the paper's three simulators (GPT-4o-mini and GPT-4o prompted to play the user, UserLM-8b),
each talking to GPT-4o on Lost-in-Conversation's sharded math and code tasks, then any other result.
Columns: intent coverage, turn-count variance, the turn-count range as two columns (its 10th and 90th
percentiles), unigram difference and the assistant's task score. Ours come from evaluate.extrinsic's
<results_dir>/<name>/extrinsic.json, its `overall` block (evaluate/extrinsic/metrics.py defines every
number); `paper_rows` maps a result name to the paper row it reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.tables import Cell, Table, beside_paper
from evaluate.tables.paper_numbers import EXTRINSIC

COLUMNS = {  # column -> its key in extrinsic.json's overall block ("a.b": block["a"]["b"]) and in EXTRINSIC
    "Intent coverage (%)": "intent_coverage",
    "Turn variance": "turns.variance",
    "Turn range p10": "turns.range_p10",
    "Turn range p90": "turns.range_p90",
    "Unigram difference": "unigram_difference",
    "Task score (%)": "task_score",
}


def _value(block: dict, key: str, path: Path):
    for part in key.split("."):
        if not isinstance(block, dict) or part not in block:
            raise ValueError(f"{path}: overall block has no {key!r}")
        block = block[part]
    return block


def build(cfg) -> Table:
    results_dir = Path(cfg.results_dir)

    def ours(name: str) -> tuple[dict[str, Cell], str]:
        path = results_dir / name / "extrinsic.json"
        result = json.loads(path.read_text())
        overall = result["overall"]
        cells = {column: Cell(ours=value, source=str(path)) for column, key in COLUMNS.items()
                 if (value := _value(overall, key, path)) is not None}
        return cells, (f"{path} ({overall['conversations']} conversations over {overall['tasks']} tasks, "
                       f"coverage: {result['coverage']['method']})")

    paper = {row: {column: numbers[key] for column, key in COLUMNS.items()} for row, numbers in EXTRINSIC.items()}
    return beside_paper(
        cfg, "extrinsic", "Extrinsic evaluation: simulated users on Lost-in-Conversation math and code tasks",
        COLUMNS, paper, sorted(p.parent.name for p in results_dir.glob("*/extrinsic.json")), ours,
        ["coverage: mean % of a task's shards the user conveyed (verbatim, else a YES/NO judge, else "
         "lexically); turns: user turns per conversation, variance and 10th/90th percentiles over a task's "
         "runs, averaged over tasks (the paper's range read as p10-p90); unigram difference: share (0-1) of "
         "the user's distinct words absent from the task's shards; task score: % of conversations whose "
         "last answer is correct. The paper does not publish these formulas: ours are in "
         "evaluate/extrinsic/metrics.py"])
