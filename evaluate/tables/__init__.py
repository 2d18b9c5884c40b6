"""Result tables in the paper's layout: ours beside the paper's numbers, as Markdown, CSV and PNG.

A table is built by a module evaluate/tables/<name>.py whose `build(section_cfg) -> Table` reads
its results (perplexity.py: evaluate.perplexity's JSON files) and lays them out beside the paper's
numbers with `beside_paper`, which every table shares (its rows, paper_rows, the cells, the notes);
`python -m evaluate.table` builds the tables its config lists and writes them with `write_table`.
Adding a table is one module, one schema field in evaluate/config.py and one YAML section: nothing
here changes.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from core import artifacts


@dataclass
class Cell:
    ours: float | None = None
    paper: float | None = None
    ci: list[float] | None = None    # ours' confidence interval, when known
    source: str | None = None        # the result file ours comes from

    @property
    def difference(self) -> float | None:
        return None if self.ours is None or self.paper is None else self.ours - self.paper


@dataclass
class Table:
    name: str                        # file stem: <output_dir>/<name>.{md,csv,png}
    title: str
    columns: list[str]
    rows: list[str]
    cells: dict[tuple[str, str], Cell]   # (row, column) -> cell; absent: neither number exists
    log_scale: bool = False          # plot on a log axis (perplexities span orders of magnitude)
    notes: list[str] = field(default_factory=list)
    number_format: str = ".2f"       # Markdown's numbers (format spec; counts: ",.0f")
    row_label: str = "model"         # the Markdown header of the rows' column

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.get((row, column), Cell())


def beside_paper(cfg, name: str, title: str, columns: Iterable[str], paper: dict[str, dict[str, float]],
                 result_names: Iterable[str], ours: Callable[[str], tuple[dict[str, Cell], str]],
                 notes: Iterable[str], log_scale: bool = False, number_format: str = ".2f",
                 row_label: str = "model") -> Table:
    """Our results beside the paper's numbers. Rows: the paper's (`paper`: row -> column -> its
    number, in its order), then each result name that `cfg.paper_rows` (result name -> the paper
    row it reproduces) does not map. `ours(result name)` -> (its cells by column: ours, ci, source;
    a note on where they come from); the table's notes: one per result, then `notes`."""
    unknown = set(cfg.paper_rows.values()) - set(paper)
    if unknown:
        raise ValueError(f"paper_rows names rows the paper does not have: {sorted(unknown)}; rows: {list(paper)}")
    names = list(result_names)
    label = {result: cfg.paper_rows.get(result, result) for result in names}
    cells = {(row, column): Cell(paper=number) for row, numbers in paper.items() for column, number in numbers.items()}
    table_notes = []
    for result in names:
        found, note = ours(result)
        for column, cell in found.items():
            target = cells.setdefault((label[result], column), Cell())
            target.ours, target.ci, target.source = cell.ours, cell.ci, cell.source
        table_notes.append(f"{label[result]}: {note}")
    return Table(name=name, title=title, columns=list(columns),
                 rows=list(paper) + [result for result in names if result not in cfg.paper_rows], cells=cells,
                 log_scale=log_scale, notes=table_notes + list(notes), number_format=number_format,
                 row_label=row_label)


def _number(value: float | None, spec: str, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, ("+" if signed else "") + spec)


def to_markdown(table: Table) -> str:
    lines = [f"## {table.title}", "", "Each cell: ours (paper, ours - paper); (paper X): not measured by us; -: neither.", "",
             f"| {table.row_label} | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for row in table.rows:
        cells = [table.cell(row, column) for column in table.columns]
        lines.append(f"| {row} | " + " | ".join(_markdown_cell(c, table.number_format) for c in cells) + " |")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines) + "\n"


def _markdown_cell(cell: Cell, spec: str) -> str:
    if cell.ours is None:
        return "-" if cell.paper is None else f"(paper {_number(cell.paper, spec)})"
    if cell.paper is None:
        return _number(cell.ours, spec)
    return f"{_number(cell.ours, spec)} ({_number(cell.paper, spec)}, {_number(cell.difference, spec, signed=True)})"


def to_csv(table: Table) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "column", "ours", "ours_ci_low", "ours_ci_high", "paper", "difference", "source"])
    for row in table.rows:
        for column in table.columns:
            c = table.cell(row, column)
            writer.writerow([row, column, _csv(c.ours), *(map(_csv, c.ci) if c.ci else ["", ""]), _csv(c.paper),
                             _csv(c.difference), c.source or ""])
    return buffer.getvalue()


def _csv(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def plot(table: Table, path: Path) -> None:
    """One panel per column: a bar per row for ours and for the paper, error bars from ours' CI."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(table.columns), figsize=(3.2 * len(table.columns), 4.2), sharey=True,
                                squeeze=False)
    positions = range(len(table.rows))
    for axis, column in zip(axes[0], table.columns):
        cells = [table.cell(row, column) for row in table.rows]
        ours = [c.ours if c.ours is not None else math.nan for c in cells]
        paper = [c.paper if c.paper is not None else math.nan for c in cells]
        errors = [[o - c.ci[0] if c.ci else 0 for o, c in zip(ours, cells)],
                  [c.ci[1] - o if c.ci else 0 for o, c in zip(ours, cells)]]
        axis.bar([p - 0.2 for p in positions], ours, width=0.4, label="ours", yerr=errors, capsize=2)
        axis.bar([p + 0.2 for p in positions], paper, width=0.4, label="paper")
        axis.set_title(column, fontsize=9)
        axis.set_xticks(list(positions), table.rows, rotation=60, ha="right", fontsize=7)
        if table.log_scale:
            axis.set_yscale("log")
    axes[0][0].legend(fontsize=8)
    figure.suptitle(table.title, fontsize=10)
    figure.tight_layout()
    # Fixed metadata: the same numbers give the same bytes.
    figure.savefig(path, format="png", dpi=120, metadata={"Software": None})
    plt.close(figure)


def write_table(table: Table, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / f"{table.name}.md", output_dir / f"{table.name}.csv", output_dir / f"{table.name}.png"]
    artifacts.write_text(paths[0], to_markdown(table))
    artifacts.write_text(paths[1], to_csv(table))
    with artifacts.atomic_file(paths[2]) as temporary:
        plot(table, temporary)
    return paths
