"""The paper's intrinsic-metrics table (Table 2; shared/reference/userlm-paper.md, section 6) beside ours.

Rows: the paper's rows we know numbers for (UserLM-8b, the prompted Llama3-8b-Instruct, human), then
any other result. Columns: the six metrics, in the paper's order. Ours come from
evaluate.intrinsic's <results_dir>/<name>/intrinsic.json (the headline `value` of each metric);
`paper_rows` maps a result name to the paper row it reproduces (human: Human).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.tables import Cell, Table

COLUMNS = {  # column -> evaluate.intrinsic's metric
    "First-turn diversity (↑)": "first_turn_diversity",
    "Intent decomposition (↓)": "intent_decomposition",
    "Dialogue termination F1 (↑)": "dialogue_termination",
    "Naturalness (↑)": "naturalness",
    "Role adherence (↑)": "role_adherence",
    "Intent adherence (↑)": "intent_adherence",
}
PAPER = {  # the paper's numbers we know, in COLUMNS order (None: not reported)
    "UserLM-8b": (94.55, 2.69, 63.54, 80.21, 93.95, 94.65),
    "Llama3-8b-Instruct": (81.31, 23.95, 3.51, 0.20, 63.25, 78.05),
    "Human": (94.01, 1.68, None, 90.15, None, None),
}


def build(cfg) -> Table:
    results_dir = Path(cfg.results_dir)
    unknown = set(cfg.paper_rows.values()) - set(PAPER)
    if unknown:
        raise ValueError(f"paper_rows names rows the paper does not have: {sorted(unknown)}; rows: {list(PAPER)}")
    names = sorted(p.parent.name for p in results_dir.glob("*/intrinsic.json"))
    label = {name: cfg.paper_rows.get(name, name) for name in names}
    rows = list(PAPER) + [name for name in names if name not in cfg.paper_rows]
    cells: dict[tuple[str, str], Cell] = {}
    for row, numbers in PAPER.items():
        for column, number in zip(COLUMNS, numbers):
            if number is not None:
                cells[row, column] = Cell(paper=number)
    notes = []
    for name in names:
        path = results_dir / name / "intrinsic.json"
        metrics = json.loads(path.read_text())["metrics"]
        for column, metric in COLUMNS.items():
            if metrics.get(metric, {}).get("value") is not None:
                cells.setdefault((label[name], column), Cell()).ours = metrics[metric]["value"]
                cells[label[name], column].source = str(path)
        notes.append(f"{label[name]}: {path}")
    notes.append("diversity: 100 x (1 - mean pairwise Jaccard) of first-turn unigram sets; decomposition: mean % of "
                 "a user turn's content words found in its intent; termination: F1 of greedy <|endconversation|> at "
                 "real ends; naturalness: mean detector P(human); adherence: % of judged conversations. The paper "
                 "does not publish every formula, detector or judge prompt: see evaluate/intrinsic_metrics.py")
    return Table(name="intrinsic", title="Intrinsic evaluation of user simulators (%)", columns=list(COLUMNS),
                 rows=rows, cells=cells, notes=notes)
