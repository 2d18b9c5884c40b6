"""The paper's intrinsic-metrics table (Table 2) beside ours; its numbers: paper_numbers.py's INTRINSIC.

Rows: the paper's rows we know numbers for (UserLM-8b, the prompted Llama3-8b-Instruct, human), then
any other result. Columns: evaluate.intrinsic's metrics (its METRICS registry), in the paper's order.
Ours come from evaluate.intrinsic's <results_dir>/<name>/intrinsic.json (each metric's headline `value`);
`paper_rows` maps a result name to the paper row it reproduces (human: Human).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.intrinsic import METRICS
from evaluate.tables import Cell, Table, beside_paper
from evaluate.tables.paper_numbers import INTRINSIC


def build(cfg) -> Table:
    """Columns: every metric of evaluate.intrinsic's registry, in its (the paper's) order."""
    results_dir = Path(cfg.results_dir)

    def ours(name: str) -> tuple[dict[str, Cell], str]:
        path = results_dir / name / "intrinsic.json"
        metrics = json.loads(path.read_text())["metrics"]
        return {METRICS[metric].column: Cell(ours=result["value"], source=str(path))
                for metric, result in metrics.items() if result["value"] is not None}, str(path)

    paper = {row: {METRICS[metric].column: number for metric, number in numbers.items()}
             for row, numbers in INTRINSIC.items()}
    return beside_paper(
        cfg, "intrinsic", "Intrinsic evaluation of user simulators (%)", [m.column for m in METRICS.values()], paper,
        sorted(p.parent.name for p in results_dir.glob("*/intrinsic.json")), ours,
        ["diversity: 100 x (1 - mean pairwise Jaccard) of first-turn unigram sets; decomposition: mean % of "
         "a user turn's content words found in its intent; termination: F1 of greedy <|endconversation|> at "
         "real ends; naturalness: mean detector P(human); adherence: % of judged conversations. The paper "
         "does not publish every formula, detector or judge prompt: see evaluate/intrinsic_metrics.py"])
