"""The paper's perplexity table (shared/reference/userlm-paper.md, section 5) beside ours.

Rows: the paper's seven models, in its order, then any other model with results. Columns: WildChat
and PRISM, each with no intent (our intent=none) and with an intent (our `intent`, task by default).
Ours come from evaluate.perplexity's <results_dir>/<name>/<dataset>-<intent>.json; `paper_rows` maps
a result name to the paper row it reproduces (for example microsoft--UserLM-8b: UserLM-8b).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.tables import Cell, Table, beside_paper

COLUMNS = {  # column -> (dataset, intent or None for the configured one)
    "WildChat no intent": ("wildchat", "none"),
    "WildChat intent": ("wildchat", None),
    "PRISM no intent": ("prism", "none"),
    "PRISM intent": ("prism", None),
}
PAPER_NUMBERS = {  # the paper's Table: held-out user-turn perplexity, in its row order and COLUMNS order
    "Llama3.2-1b-Base": (37.68, 29.09, 84.00, 53.54),
    "Llama3-8b-Base": (98.29, 48.13, 89.98, 40.86),
    "Llama3.2-1b-Instruct": (26.08, 16.08, 35.02, 20.80),
    "Llama3-8b-Instruct": (26.19, 21.40, 40.25, 36.29),
    "USP-8b": (32.08, 21.78, 50.91, 30.16),
    "UserLM-1b": (8.30, 7.78, 18.58, 10.33),
    "UserLM-8b": (5.60, 4.33, 14.92, 7.42),
}
PAPER = {row: dict(zip(COLUMNS, numbers)) for row, numbers in PAPER_NUMBERS.items()}


def build(cfg) -> Table:
    results_dir = Path(cfg.results_dir)

    def ours(name: str) -> tuple[dict[str, Cell], str]:
        cells, scoring = {}, set()
        for column, (dataset, intent) in COLUMNS.items():
            path = results_dir / name / f"{dataset}-{intent or cfg.intent}.json"
            if not path.exists():
                continue
            result = json.loads(path.read_text())
            cells[column] = Cell(ours=result["ppl"], ci=result["ppl_ci"], source=str(path))
            scoring.add(f"protocol {result['protocol']}, {result['mode']}, <|endconversation|> "
                        f"{result['end_token']['handling']}")
        return cells, f"{results_dir / name} ({'; '.join(sorted(scoring)) or 'no result in these columns'})"

    return beside_paper(
        cfg, "perplexity", "Held-out perplexity of user turns (lower is better)", COLUMNS, PAPER,
        sorted({p.parent.name for p in results_dir.glob("*/*.json")}), ours,
        [f"ours: intent=none for the no-intent columns, intent={cfg.intent} for the intent columns; "
         "ours' bootstrap intervals over conversations are in the CSV"], log_scale=True)
