"""The paper's perplexity table beside ours (its numbers: evaluate/tables/paper_numbers.py's PERPLEXITY).

Rows: the paper's seven models, in its order, then any other model with results. Columns: WildChat
and PRISM, each with no intent (our intent=none) and with an intent (our `intent`, task by default).
Ours come from evaluate.perplexity's <results_dir>/<name>/<dataset>-<intent>.json; `paper_rows` maps
a result name to the paper row it reproduces (for example microsoft--UserLM-8b: UserLM-8b).
"""

from __future__ import annotations

import json
from pathlib import Path

from evaluate.tables import Cell, Table, beside_paper
from evaluate.tables.paper_numbers import PERPLEXITY

COLUMNS = {  # column -> (dataset, intent or None for the configured one), in PERPLEXITY's order
    "WildChat no intent": ("wildchat", "none"),
    "WildChat intent": ("wildchat", None),
    "PRISM no intent": ("prism", "none"),
    "PRISM intent": ("prism", None),
}
PAPER = {row: dict(zip(COLUMNS, numbers, strict=True)) for row, numbers in PERPLEXITY.items()}


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
