"""`python -m evaluate.table`: the paper's result tables with our numbers beside its own.

    python -m evaluate.table experiment=tiny      # outputs/tiny/results/tables/perplexity.{md,csv,png}
    python -m evaluate.table                      # results/tables/

Each name in `tables` is a module evaluate/tables/<name>.py with build(cfg.<name>) -> Table
(evaluate/tables/__init__.py); every table is written as Markdown, CSV and a PNG plot.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import hydra

import evaluate.config  # noqa: F401  (registers the config schemas)
from core import artifacts
from evaluate.tables import to_markdown, write_table


def run(cfg) -> list[Path]:
    written = []
    with artifacts.owned_directory(cfg.output_dir, "table") as output_dir:
        for name in cfg.tables:
            table = importlib.import_module(f"evaluate.tables.{name}").build(cfg[name])
            written += write_table(table, output_dir)
            print(to_markdown(table))
    print("wrote " + ", ".join(map(str, written)))
    return written


@hydra.main(version_base="1.3", config_path="../conf/table", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
