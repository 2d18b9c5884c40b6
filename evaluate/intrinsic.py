"""`python -m evaluate.intrinsic`: the paper's six intrinsic metrics of a user simulator (Table 2).

    python -m evaluate.simulate experiment=paper ...                 # first: conversations to measure
    OPENAI_API_KEY=... python -m evaluate.intrinsic experiment=paper \\
        simulation=outputs/paper/simulate/microsoft--UserLM-8b         # GPT-4o judges (the preset)
    python -m evaluate.intrinsic experiment=tiny                     # the tiny pipeline, CPU
    python -m evaluate.intrinsic ... metrics=[first_turn_diversity,intent_decomposition]   # a subset

The user LM, its prompting protocol, sampling and guardrails are the simulation's own (its
config.yaml), so every metric describes the same simulator:
    first_turn_diversity, naturalness   the first user turns of the simulation's transcripts
    intent_decomposition                every user turn of the transcripts
    dialogue_termination                the user LM teacher-forced on real conversations (PRISM)
    role_adherence, intent_adherence    new two-turn conversations with a testing assistant, judged
With `human: true` the same transcript metrics are computed on the real conversations of the same
intents (when the simulation read them from a data_prep directory): the paper's "human" row.
Writes <output_dir>/<name>/intrinsic.json (every metric with its details, the simulation's settings,
the resolved config, package versions; no timings) and the adherence conversations with their
verdicts (role_adherence.jsonl, intent_adherence.jsonl). Formulas: evaluate/intrinsic_metrics.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForSequenceClassification

import evaluate.simulate_config  # noqa: F401  (registers the config schemas)
from core import artifacts, runtime
from core.llm_client import check_config_key_names
from core.prepared import load_conversations
from data_prep.chat_format import USER
from evaluate import intrinsic_metrics as m
from evaluate.assistants import describe, make_assistant
from evaluate.judges import converse, judge, load_items
from evaluate.simulator import UserSimulator
from evaluate.transcripts import read_transcripts

# ---- the metrics: name -> how to compute it, its headline number, what it needs, its Table 2 column --------
TRANSCRIPTS, USER_LM, JUDGE = "transcripts", "user_lm", "judge"   # what a metric needs, computed in this order


@dataclass(frozen=True)
class Metric:
    compute: Callable[[DictConfig, "Inputs"], dict]   # (the intrinsic config, what it reads) -> its result
    headline: str                  # the result's key reported as the metric's value (the table's number)
    needs: str                     # TRANSCRIPTS (also run on the human reference), USER_LM or JUDGE
    column: str                    # its column in the paper's Table 2 (evaluate/tables/intrinsic.py)


METRICS = {  # in the paper's Table 2 order; formulas in evaluate/intrinsic_metrics.py
    "first_turn_diversity": Metric(lambda cfg, x: m.first_turn_diversity(x.first_turns),
                                   "jaccard_diversity", TRANSCRIPTS, "First-turn diversity (↑)"),
    "intent_decomposition": Metric(lambda cfg, x: m.intent_decomposition(x.conversations, cfg.intent_prefix),
                                   "overlap", TRANSCRIPTS, "Intent decomposition (↓)"),
    "dialogue_termination": Metric(lambda cfg, x: termination(cfg.termination, x.models.simulator),
                                   "f1", USER_LM, "Dialogue termination F1 (↑)"),
    "naturalness": Metric(lambda cfg, x: naturalness(cfg.naturalness, x.first_turns, x.models.detector),
                          "human_probability", TRANSCRIPTS, "Naturalness (↑)"),
    "role_adherence": Metric(lambda cfg, x: adherence(cfg, "role_adherence", "commonsense_qa", x),
                             "adherence", JUDGE, "Role adherence (↑)"),
    "intent_adherence": Metric(lambda cfg, x: adherence(cfg, "intent_adherence", "nq_open", x),
                               "adherence", JUDGE, "Intent adherence (↑)"),
}


def user_turns(turns) -> list[str]:
    return [t["content"] for t in turns if t["role"] == USER]


class Models:
    """The models the metrics run, each loaded on first use and shared by the simulation's and the
    human reference's metrics: the AI-text detector, the simulation's user LM."""

    def __init__(self, cfg, sim_cfg):
        self.cfg, self.sim_cfg = cfg, sim_cfg

    @cached_property
    def detector(self):
        """The AI-text detector and its tokenizer, in float32 (it is small, and its scores are the metric)."""
        n = self.cfg.naturalness
        tokenizer = runtime.load_tokenizer(n.detector, trust_remote_code=n.trust_remote_code)
        model = runtime.load_model(AutoModelForSequenceClassification, n.detector, "float32", n.device,
                                   trust_remote_code=n.trust_remote_code)
        return model, tokenizer

    @cached_property
    def simulator(self) -> UserSimulator:
        torch.manual_seed(self.cfg.seed)
        return UserSimulator.from_config(self.sim_cfg.user_model, self.sim_cfg.sampling, self.sim_cfg.guardrails)


@dataclass
class Inputs:
    """What a metric reads: conversations as (intent, user turns) pairs, simulated or real."""
    conversations: list[tuple[str, list[str]]]
    first_turns: list[str]         # the first `first_turns` conversations' first user turns
    models: Models
    out_dir: Path                  # where a metric writes its per-item records

    @classmethod
    def of(cls, cfg, conversations, models: Models, out_dir: Path) -> "Inputs":
        first_turns = [turns[0] for _, turns in conversations if turns][:cfg.first_turns]
        return cls(conversations, first_turns, models, out_dir)


def compute(cfg, names, inputs: Inputs) -> dict:
    """The results of the metrics `names`: those that need less first (transcripts, the user LM, a
    judge), each kind in METRICS' order."""
    order = [name for needs in (TRANSCRIPTS, USER_LM, JUDGE) for name, metric in METRICS.items()
             if metric.needs == needs and name in names]
    return {name: METRICS[name].compute(cfg, inputs) for name in order}


def with_headlines(results: dict) -> dict:
    return {name: {"value": result.get(METRICS[name].headline), **result} for name, result in results.items()}


def save(path: Path, name: str, results: dict, extra: dict) -> None:
    artifacts.write_json(path, {"name": name, "metrics": with_headlines(results), **extra,
                                "packages": artifacts.package_versions()})


def run(cfg) -> Path:
    """Measure one simulation into <output_dir>/<name>/, holding that directory's lock."""
    check_config_key_names(cfg)  # before the config is written anywhere
    simulation = Path(cfg.simulation)
    with artifacts.owned_directory(Path(cfg.output_dir) / (cfg.name or simulation.name), "intrinsic") as out_dir:
        return measure(cfg, simulation, out_dir)


def measure(cfg, simulation: Path, out_dir: Path) -> Path:
    # ---- config and the simulation ------------------------------------------------------------------
    unknown = set(cfg.metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"metrics: unknown {sorted(unknown)}; expected some of {list(METRICS)}")
    if not (simulation / "summary.json").exists():
        raise FileNotFoundError(f"{simulation} is not a finished evaluate.simulate output (no summary.json)")
    sim_cfg = OmegaConf.load(simulation / "config.yaml")
    sim_manifest = json.loads((simulation / "manifest.json").read_text())
    records = read_transcripts(simulation / "transcripts.jsonl")
    name = out_dir.name
    provenance = {"simulation": {"dir": str(simulation), "user_model": OmegaConf.to_container(sim_cfg.user_model),
                                 "sampling": OmegaConf.to_container(sim_cfg.sampling),
                                 "guardrails": OmegaConf.to_container(sim_cfg.guardrails),
                                 "transcripts_sha256": artifacts.sha256_of(simulation / "transcripts.jsonl")},
                  "config": artifacts.resolved_config(cfg)}

    # ---- the metrics: the transcripts' first, then the user LM's, then the judged ones ----------------
    models = Models(cfg, sim_cfg)
    conversations = [(r["intent"], user_turns(r["turns"])) for r in records]
    results = compute(cfg, cfg.metrics, Inputs.of(cfg, conversations, models, out_dir))

    # ---- save; the human reference --------------------------------------------------------------
    path = out_dir / "intrinsic.json"
    save(path, name, results, provenance)
    if cfg.human:
        human_reference(cfg, sim_manifest, records, models)
    for metric, result in with_headlines(results).items():
        print(f"{name} {metric}: {result['value'] if result['value'] is None else round(result['value'], 2)}")
    print(f"wrote {path}")
    return path


def naturalness(cfg, first_turns: list[str], detector) -> dict:
    return {"detector": cfg.detector, **m.naturalness(first_turns, *detector, cfg.human_label, cfg.batch_size,
                                                      cfg.max_length)}


def adherence(cfg, metric: str, item_kind: str, inputs: Inputs) -> dict:
    """Two-turn conversations of the simulation's user LM with the section's testing assistant, judged;
    each with its verdict in <out_dir>/<metric>.jsonl."""
    section, simulator = cfg[metric], inputs.models.simulator
    items = load_items(item_kind, section.data.source, section.data.split, section.data.revision, section.data.limit)
    assistant_cfg = OmegaConf.merge(cfg.assistant, {"system_prompt": section.assistant_system_prompt,
                                                    "scripted": {"replies": section.assistant_replies}})
    exchanges = converse(simulator, make_assistant(assistant_cfg), items, section.intent_template,
                         inputs.models.sim_cfg.conversation.end_allowed_after)
    judge(exchanges, cfg.judge.client, section.judge_prompt, section.adhered_when, cfg.judge.max_tokens)
    artifacts.write_text(inputs.out_dir / f"{metric}.jsonl", "".join(
        json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in exchanges))
    return {"items": section.data.source, "assistant": describe(assistant_cfg), "judge_model": cfg.judge.client.model,
            "ended_by_user": sum(bool(e["ended_at"]) for e in exchanges),
            **m.adherence([e["adhered"] for e in exchanges])}


def termination(cfg, simulator) -> dict:
    if simulator.protocol.name != "userlm" or simulator.end_token_id is None:
        return {"skipped": "needs the userlm protocol and <|endconversation|> in the vocabulary"}
    rows = load_conversations(cfg.data_dir, cfg.split, cfg.limit).select_columns(["intent", "turns", "ended"]).to_list()
    decisions = m.termination_decisions(simulator.sampler.model, simulator.protocol, rows, cfg.max_seq_len,
                                        cfg.max_tokens_per_batch, cfg.max_batch_size)
    real, probability = np.asarray(decisions["real_end"]), np.asarray(decisions["end_probability"])
    return {"data_dir": cfg.data_dir, "conversations": len(rows), "skipped_positions": decisions["skipped_positions"],
            "mean_end_probability_at_real_ends": float(probability[real].mean()) if real.any() else None,
            "mean_end_probability_elsewhere": float(probability[~real].mean()) if (~real).any() else None,
            **m.dialogue_termination(decisions["predicted_end"], decisions["real_end"])}


def human_reference(cfg, sim_manifest: dict, records: list[dict], models: Models) -> None:
    """The transcript metrics on the real conversations behind the simulation's intents."""
    source = sim_manifest["intents"]
    if "data_dir" not in source:
        print("human: skipped (the simulation's intents did not come from a data_prep directory)")
        return
    real = load_conversations(source["data_dir"], source["split"])
    by_hash = {row["conversation_hash"]: row for row in real.select_columns(["conversation_hash", "intent", "turns"])}
    rows = [by_hash[r["id"].split("#")[0]] for r in records if r["id"].split("#")[0] in by_hash]
    conversations = [(row["intent"], user_turns(row["turns"])) for row in rows]
    names = [name for name in cfg.metrics if METRICS[name].needs == TRANSCRIPTS]
    with artifacts.owned_directory(Path(cfg.output_dir) / "human", "intrinsic") as human_dir:
        results = compute(cfg, names, Inputs.of(cfg, conversations, models, human_dir))
        save(human_dir / "intrinsic.json", "human", results,
             {"data": {**source, "conversations": len(rows)}, "config": artifacts.resolved_config(cfg)})


@hydra.main(version_base="1.3", config_path="../conf/intrinsic", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
