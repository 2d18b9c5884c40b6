"""python -m evaluate.table: our perplexity results beside the paper's numbers, in its layout."""

import csv
import io
import json

import pytest

import evaluate.config  # noqa: F401  (registers the schemas before composing)
from evaluate.perplexity import run as run_perplexity
from evaluate.table import run
from evaluate.tables.perplexity import PAPER
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory, tiny_assets, tiny_userlm_model, tiny_data, tiny_prism):
    results = tmp_path_factory.mktemp("results")
    runs = [(tiny_userlm_model, "tiny-trained", dataset, intent)
            for dataset in ("wildchat", "prism") for intent in ("none", "task")]
    runs.append((tiny_assets / "model", "tiny-untrained", "wildchat", "task"))
    for model, name, dataset, intent in runs:
        run_perplexity(compose_config("perplexity", [
            "experiment=tiny", f"model={model}", f"name={name}", f"dataset={dataset}", f"intent={intent}",
            f"data_dirs.wildchat={tiny_data}", f"data_dirs.prism={tiny_prism}", f"output_dir={results}",
            "limit=5", "bootstrap.samples=50"]))
    return results


def table_config(results_dir, output_dir, *extra):
    return compose_config("table", [f"perplexity.results_dir={results_dir}", f"output_dir={output_dir}",
                                    "+perplexity.paper_rows.tiny-trained=UserLM-8b", *extra])


def test_table_puts_ours_beside_the_paper(tmp_path, results_dir):
    md, csv_path, png = run(table_config(results_dir, tmp_path))
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    by_key = {(r["row"], r["column"]): r for r in rows}
    assert len(rows) == (len(PAPER) + 1) * 4  # the paper's rows, then tiny-untrained
    ours = json.loads((results_dir / "tiny-trained" / "prism-task.json").read_text())
    cell = by_key["UserLM-8b", "PRISM intent"]
    assert float(cell["ours"]) == ours["ppl"] and float(cell["paper"]) == 7.42
    assert float(cell["difference"]) == pytest.approx(ours["ppl"] - 7.42)
    assert [float(cell["ours_ci_low"]), float(cell["ours_ci_high"])] == ours["ppl_ci"]
    assert by_key["UserLM-1b", "WildChat intent"]["ours"] == "" and by_key["UserLM-1b", "WildChat intent"]["paper"] == "7.78"
    assert by_key["tiny-untrained", "WildChat intent"]["ours"] and not by_key["tiny-untrained", "PRISM intent"]["ours"]
    text = md.read_text()
    assert "| model | WildChat no intent | WildChat intent | PRISM no intent | PRISM intent |" in text
    assert f"| UserLM-8b | {ours_cell(results_dir, 'wildchat-none', 5.60)}" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = [p.read_bytes() for p in (md, csv_path, png)]
    run(table_config(results_dir, tmp_path))
    assert [p.read_bytes() for p in (md, csv_path, png)] == first  # same results, same bytes


def ours_cell(results_dir, stem, paper):
    value = json.loads((results_dir / "tiny-trained" / f"{stem}.json").read_text())["ppl"]
    return f"{value:.2f} ({paper:.2f}, {value - paper:+.2f})"


def test_unknown_paper_row_is_an_error(tmp_path, results_dir):
    with pytest.raises(ValueError, match="UserLM-9b"):
        run(table_config(results_dir, tmp_path, "perplexity.paper_rows.tiny-trained=UserLM-9b"))
