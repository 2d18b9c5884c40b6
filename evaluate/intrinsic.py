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
from pathlib import Path

import datasets
import hydra
import numpy as np
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForSequenceClassification

import evaluate.simulate_config  # noqa: F401  (registers the config schemas)
from core import artifacts, runtime
from core.llm_client import check_config_key_names
from data_prep.chat_format import USER
from evaluate import intrinsic_metrics as m
from evaluate.assistants import describe, make_assistant
from evaluate.judges import converse, judge, load_items
from evaluate.simulator import UserSimulator
from evaluate.transcripts import read_transcripts

METRICS = ("first_turn_diversity", "intent_decomposition", "dialogue_termination", "naturalness",
           "role_adherence", "intent_adherence")
HEADLINE = {"first_turn_diversity": "jaccard_diversity", "intent_decomposition": "overlap",
            "dialogue_termination": "f1", "naturalness": "human_probability", "role_adherence": "adherence",
            "intent_adherence": "adherence"}
ITEM_KIND = {"role_adherence": "commonsense_qa", "intent_adherence": "nq_open"}


def user_turns(turns) -> list[str]:
    return [t["content"] for t in turns if t["role"] == USER]


def transcript_metrics(cfg, conversations: list[tuple[str, list[str]]], detector) -> dict:
    """The metrics read off conversations: (intent, user turns) pairs, simulated or real."""
    first_turns = [turns[0] for _, turns in conversations if turns][:cfg.first_turns]
    results = {}
    if "first_turn_diversity" in cfg.metrics:
        results["first_turn_diversity"] = m.first_turn_diversity(first_turns)
    if "intent_decomposition" in cfg.metrics:
        results["intent_decomposition"] = m.intent_decomposition(conversations, cfg.intent_prefix)
    if "naturalness" in cfg.metrics:
        results["naturalness"] = {"detector": cfg.naturalness.detector, **m.naturalness(
            first_turns, *detector, cfg.naturalness.human_label, cfg.naturalness.batch_size,
            cfg.naturalness.max_length)}
    return results


def load_detector(cfg):
    """The AI-text detector and its tokenizer, in float32 (it is small, and its scores are the metric)."""
    n = cfg.naturalness
    tokenizer = runtime.load_tokenizer(n.detector, trust_remote_code=n.trust_remote_code)
    model = runtime.load_model(AutoModelForSequenceClassification, n.detector, "float32", n.device,
                               trust_remote_code=n.trust_remote_code)
    return model, tokenizer


def with_headlines(results: dict) -> dict:
    return {name: {"value": result.get(HEADLINE[name]), **result} for name, result in results.items()}


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

    # ---- metrics of the transcripts -----------------------------------------------------------------
    detector = load_detector(cfg) if "naturalness" in cfg.metrics else None
    conversations = [(r["intent"], user_turns(r["turns"])) for r in records]
    results = transcript_metrics(cfg, conversations, detector)

    # ---- the user LM itself: termination, adherence --------------------------------------------------
    if {"dialogue_termination", "role_adherence", "intent_adherence"} & set(cfg.metrics):
        torch.manual_seed(cfg.seed)
        simulator = UserSimulator.from_config(sim_cfg.user_model, sim_cfg.sampling, sim_cfg.guardrails)
    if "dialogue_termination" in cfg.metrics:
        results["dialogue_termination"] = termination(cfg.termination, simulator)
    for metric in ("role_adherence", "intent_adherence"):
        if metric in cfg.metrics:
            section = cfg[metric]
            items = load_items(ITEM_KIND[metric], section.data.source, section.data.split,
                               section.data.revision, section.data.limit)
            assistant_cfg = OmegaConf.merge(cfg.assistant, {"system_prompt": section.assistant_system_prompt,
                                                            "scripted": {"replies": section.assistant_replies}})
            exchanges = converse(simulator, make_assistant(assistant_cfg), items, section.intent_template,
                                 sim_cfg.conversation.end_allowed_after)
            judge(exchanges, cfg.judge.client, section.judge_prompt, section.adhered_when, cfg.judge.max_tokens)
            artifacts.write_text(out_dir / f"{metric}.jsonl", "".join(
                json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in exchanges))
            results[metric] = {"items": section.data.source, "assistant": describe(assistant_cfg),
                               "judge_model": cfg.judge.client.model,
                               "ended_by_user": sum(bool(e["ended_at"]) for e in exchanges),
                               **m.adherence([e["adhered"] for e in exchanges])}

    # ---- save; the human reference --------------------------------------------------------------
    path = out_dir / "intrinsic.json"
    save(path, name, results, provenance)
    if cfg.human:
        human_reference(cfg, sim_manifest, records, detector)
    for metric, result in with_headlines(results).items():
        print(f"{name} {metric}: {result['value'] if result['value'] is None else round(result['value'], 2)}")
    print(f"wrote {path}")
    return path


def termination(cfg, simulator) -> dict:
    if simulator.protocol.name != "userlm" or simulator.end_token_id is None:
        return {"skipped": "needs the userlm protocol and <|endconversation|> in the vocabulary"}
    data = datasets.load_from_disk(str(Path(cfg.data_dir) / "conversations" / cfg.split))
    if cfg.limit is not None:
        data = data.select(range(min(cfg.limit, len(data))))
    rows = data.select_columns(["intent", "turns", "ended"]).to_list()
    decisions = m.termination_decisions(simulator.sampler.model, simulator.protocol, rows, cfg.max_seq_len,
                                        cfg.max_tokens_per_batch, cfg.max_batch_size)
    real, probability = np.asarray(decisions["real_end"]), np.asarray(decisions["end_probability"])
    return {"data_dir": cfg.data_dir, "conversations": len(rows), "skipped_positions": decisions["skipped_positions"],
            "mean_end_probability_at_real_ends": float(probability[real].mean()) if real.any() else None,
            "mean_end_probability_elsewhere": float(probability[~real].mean()) if (~real).any() else None,
            **m.dialogue_termination(decisions["predicted_end"], decisions["real_end"])}


def human_reference(cfg, sim_manifest: dict, records: list[dict], detector) -> None:
    """The transcript metrics on the real conversations behind the simulation's intents."""
    source = sim_manifest["intents"]
    if "data_dir" not in source:
        print("human: skipped (the simulation's intents did not come from a data_prep directory)")
        return
    real = datasets.load_from_disk(str(Path(source["data_dir"]) / "conversations" / source["split"]))
    by_hash = {row["conversation_hash"]: row for row in real.select_columns(["conversation_hash", "intent", "turns"])}
    rows = [by_hash[r["id"].split("#")[0]] for r in records if r["id"].split("#")[0] in by_hash]
    results = transcript_metrics(cfg, [(row["intent"], user_turns(row["turns"])) for row in rows], detector)
    with artifacts.owned_directory(Path(cfg.output_dir) / "human", "intrinsic") as human_dir:
        save(human_dir / "intrinsic.json", "human", results,
             {"data": {**source, "conversations": len(rows)}, "config": artifacts.resolved_config(cfg)})


@hydra.main(version_base="1.3", config_path="../conf/intrinsic", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
