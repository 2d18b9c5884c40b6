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


def extrinsic_result(coverage, variance, p10, p90, difference, score):
    overall = {"conversations": 20, "tasks": 2, "task_score": score, "intent_coverage": coverage,
               "turns": {"mean": 3.0, "variance": variance, "range_p10": p10, "range_p90": p90},
               "unigram_difference": difference}
    return {"by_kind": {}, "overall": overall, "end_reasons": {}, "coverage": {"method": "lexical"}}


def test_extrinsic_table_beside_table_3(tmp_path):
    results = tmp_path / "extrinsic"
    for name, numbers in {"tiny-user": (80.0, 1.25, 2.5, 4.0, 0.5, 60.0),
                          "verbatim_shards": (100.0, 0.0, 3.0, 3.0, 0.0, None)}.items():
        (results / name).mkdir(parents=True)
        (results / name / "extrinsic.json").write_text(json.dumps(extrinsic_result(*numbers)))
    md, csv_path, png = run(compose_config("table", [
        "tables=[extrinsic]", f"extrinsic.results_dir={results}", f"output_dir={tmp_path / 'tables'}",
        "+extrinsic.paper_rows.tiny-user=UserLM-8b user"]))
    by_key = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    assert len(by_key) == 4 * 6    # the paper's three rows and verbatim_shards, six columns
    cell = by_key["UserLM-8b user", "Turn range p90"]
    assert (cell["ours"], cell["paper"], cell["difference"]) == ("4.0", "6.7", repr(4.0 - 6.7))
    assert (by_key["GPT-4o user", "Unigram difference"]["ours"], by_key["GPT-4o user", "Unigram difference"]["paper"]) \
        == ("", "0.4")
    assert by_key["verbatim_shards", "Task score (%)"]["ours"] == ""      # null in the result: no number
    assert by_key["verbatim_shards", "Intent coverage (%)"]["ours"] == "100.0"
    text = md.read_text()
    assert ("| model | Intent coverage (%) | Turn variance | Turn range p10 | Turn range p90 | Unigram difference "
            "| Task score (%) |") in text
    assert ("| UserLM-8b user | 80.00 (76.70, +3.30) | 1.25 (2.80, -1.55) | 2.50 (2.10, +0.40) | 4.00 (6.70, -2.70) "
            "| 0.50 (0.71, -0.21) | 60.00 (57.40, +2.60) |") in text
    assert "| GPT-4o-mini user | (paper 86.60) | (paper 0.90) | (paper 3.70) | (paper 5.70) | (paper 0.43) |" in text
    assert "| verbatim_shards | 100.00 | 0.00 | 3.00 | 3.00 | 0.00 | - |" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_funnel_table_with_deltas(tmp_path):
    funnel = {"input": 348, "kept": {"train": 225, "validation": 3, "test": 14}, "kept_total": 242,
              "examples": {"train": 739, "validation": 11, "test": 38}, "events": {},
              "steps": [{"step": "malformed", "removed": 5, "reasons": {}}, {"step": "language", "removed": 18, "reasons": {}},
                        {"step": "exact_duplicate", "removed": 8, "reasons": {}},
                        {"step": "near_duplicate", "removed": 75, "reasons": {}},
                        {"step": "missing_intent", "removed": 0, "reasons": {}}]}
    (tmp_path / "funnel.json").write_text(json.dumps(funnel))
    md, csv_path, _ = run(compose_config("table", [
        "tables=[funnel]", f"funnel.files.wildchat={tmp_path / 'funnel.json'}", f"output_dir={tmp_path / 'tables'}",
        f"+funnel.files.missing={tmp_path / 'nowhere.json'}"]))
    by_key = {(r["row"], r["column"]): r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    assert len(by_key) == 8     # one row: the missing file is left out
    # English: 348 - 5 - 18 = 325; after near-duplicates: 325 - 8 - 75 = 242.
    assert (by_key["WildChat-1M", "English"]["ours"], by_key["WildChat-1M", "English"]["paper"],
            by_key["WildChat-1M", "English"]["difference"]) == ("325.0", "478498.0", repr(325.0 - 478498))
    assert by_key["WildChat-1M", "After near-duplicate removal"]["ours"] == "242.0"
    assert by_key["WildChat-1M", "Test samples"]["ours"] == "38.0"
    text = md.read_text()
    assert ("| data | English | After near-duplicate removal | Train conversations | Validation conversations "
            "| Test conversations | Train samples | Validation samples | Test samples |") in text
    assert ("| WildChat-1M | 325 (478,498, -478,173) | 242 (384,336, -384,094) | 225 (343,951, -343,726) "
            "| 3 (22,442, -22,439) | 14 (17,943, -17,929) | 739 (1,047,930, -1,047,191) | 11 (118,291, -118,280) "
            "| 38 (137,224, -137,186) |") in text


def test_tables_without_results_show_the_paper(tmp_path):
    md_extrinsic, _, _, md_funnel, _, _ = run(compose_config("table", [
        "tables=[extrinsic,funnel]", f"extrinsic.results_dir={tmp_path / 'none'}", f"output_dir={tmp_path / 'tables'}",
        f"funnel.files.wildchat={tmp_path / 'none.json'}"]))
    assert "| UserLM-8b user | (paper 76.70) | (paper 2.80) | (paper 2.10) | (paper 6.70) | (paper 0.71) | (paper 57.40) |" \
        in md_extrinsic.read_text()
    assert "| WildChat-1M | (paper 478,498) | (paper 384,336) |" in md_funnel.read_text()


def test_presets_read_the_extrinsic_results_and_the_funnel_where_their_stages_write():
    # (test_perplexity.py::test_presets_compose checks that both presets list every table)
    tiny, paper = (compose_config("table", [f"experiment={preset}"]) for preset in ("tiny", "paper"))
    assert (tiny.extrinsic.results_dir, tiny.funnel.files.wildchat) == (
        "outputs/tiny/results/extrinsic", "outputs/tiny/data/wildchat/funnel.json")
    assert (paper.extrinsic.results_dir, paper.funnel.files.wildchat) == (
        "results/extrinsic", "outputs/paper/data/wildchat/funnel.json")
