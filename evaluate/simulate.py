"""`python -m evaluate.simulate`: a user LM talks to an assistant, one conversation per intent.

    python -m evaluate.simulate experiment=tiny                      # tiny model vs itself, CPU, seconds
    OPENAI_API_KEY=... python -m evaluate.simulate experiment=paper   # UserLM-8b vs GPT-4o (the preset)
    python -m evaluate.simulate experiment=paper user_model.name_or_path=outputs/paper/train/model \\
        assistant.openai.base_url=http://localhost:8000/v1 assistant.openai.model=<served model>
    python -m evaluate.simulate ... sampling=generation_config       # the generation_config's 0.6 / 0.9
    python -m evaluate.simulate ... guardrails.first_word.enabled=false   # switch a guardrail off

Intents come from an intents JSONL ({conversation_hash, intent}) or a data_prep output directory
(its conversations/<intents.split>). The assistant is a local HF model, any OpenAI-compatible
endpoint (vLLM, TGI, OpenAI; the intents stage's client) or a fixed script (evaluate.assistants).
Outputs in `output_dir`:
    transcripts.jsonl   one finished conversation per line, with per-turn guardrail metadata
    summary.json        turns per conversation, end reasons (assistant errors by reason), each
                        guardrail's intervention rate, prompts cut to the user LM's context
Failures stay per conversation: an assistant request that fails for good (an HTTP error, a reply
over assistant.openai.max_response_bytes) ends that conversation as assistant_error, an intent too
long for the user LM's context as intent_too_long; the others go on. User-LM prompts are cut to
the model's context by a fixed rule (evaluate.simulator). A dead assistant endpoint stops the run
(resumable).
    config.yaml, manifest.json   the resolved config, intents provenance, package versions
Resumable: conversations already in transcripts.jsonl are not redone (a torn last line is cut).
Reproducible for one uninterrupted run: same config and intents, same bytes. Sampling is batched,
so a resumed run draws the remaining conversations in other batches than an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import evaluate.simulate_config  # noqa: F401  (registers the config schema)
from core import artifacts
from core.llm_client import check_config_key_names
from evaluate.assistants import describe, make_assistant
from evaluate.guardrails import GUARDRAILS
from evaluate.simulator import GuardrailSettings, UserSimulator, simulate_conversations
from core.jsonl import JsonlWriter
from evaluate.transcripts import read_intent_items, read_transcripts, summarise


def check_same_config(output_dir: Path, config_yaml: str) -> None:
    """A run resumes only into an output_dir written by the same config."""
    previous = output_dir / "config.yaml"
    if previous.exists() and previous.read_text() != config_yaml:
        raise FileExistsError(f"{output_dir} holds a simulation with another config (see its config.yaml): "
                              "choose another output_dir, or delete it to start over")


def resume_into(cfg, output_dir: Path) -> tuple:
    """Start or resume a run that appends conversations to <output_dir>/transcripts.jsonl: its config
    without `progress` (refused when the directory holds another config's run, then written to
    config.yaml), the transcripts' path and their writer (a torn last line cut)."""
    run_config = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "progress"])
    config_yaml = OmegaConf.to_yaml(run_config, resolve=True)
    check_same_config(output_dir, config_yaml)
    artifacts.write_text(output_dir / "config.yaml", config_yaml)
    transcripts_path = output_dir / "transcripts.jsonl"
    return run_config, transcripts_path, JsonlWriter(transcripts_path)


def run(cfg) -> Path:
    """Simulate into `cfg.output_dir`, holding its lock: one simulation per output directory."""
    check_config_key_names(cfg)  # before the config is written anywhere
    with artifacts.owned_directory(cfg.output_dir, "simulate") as output_dir:
        return simulate(cfg, output_dir)


def simulate(cfg, output_dir: Path) -> Path:
    # ---- config and what is already done ---------------------------------------------------------
    run_config, transcripts_path, writer = resume_into(cfg, output_dir)
    done = {r["id"] for r in read_transcripts(transcripts_path)}

    # ---- intents -----------------------------------------------------------------------------
    items, provenance = read_intent_items(cfg.intents.path, cfg.intents.split, cfg.intents.limit)
    todo = [item for item in items if item["id"] not in done]
    artifacts.write_json(output_dir / "manifest.json", {
        "config": artifacts.resolved_config(run_config), "intents": provenance,
        "assistant": describe(cfg.assistant), "packages": artifacts.package_versions()})
    print(f"{len(items)} intents: {len(items) - len(todo)} conversations already done, {len(todo)} to simulate")

    # ---- user LM and assistant ---------------------------------------------------------------
    if todo:
        torch.manual_seed(cfg.seed)
        simulator = UserSimulator.from_config(cfg.user_model, cfg.sampling, cfg.guardrails, cfg.seed)
        assistant = make_assistant(cfg.assistant)

        # ---- simulate: every finished conversation is written (and fsynced) at once ------------------
        conversations = simulate_conversations(simulator, assistant, todo, cfg.conversation.max_user_turns,
                                               cfg.conversation.end_allowed_after, cfg.user_model.batch_size)
        with writer, tqdm(total=len(items), initial=len(items) - len(todo), desc="simulate", unit="conversation",
                          disable=not cfg.progress) as bar:
            for conversation in conversations:
                writer.append(conversation)
                bar.update()
    else:
        writer.close()

    # ---- summary over the whole run (resumed parts included), in the intents' order -------------------
    by_id = {r["id"]: r for r in read_transcripts(transcripts_path)}
    records = [by_id[item["id"]] for item in items if item["id"] in by_id]
    summary = summarise(records, GuardrailSettings.from_config(cfg.guardrails).enabled())
    artifacts.write_json(output_dir / "summary.json", summary)
    per_turn = summary["user_turns_per_conversation"]
    rates = ", ".join(f"{name} {summary['guardrails'][name]['rate']:.3f}"
                      for name in GUARDRAILS)
    print(f"{summary['conversations']} conversations, {per_turn['mean']:.2f} user turns each; end reasons "
          f"{json.dumps(summary['end_reasons'])} (assistant errors {json.dumps(summary['assistant_errors'])}); "
          f"guardrail rates: {rates}; failed turns {summary['guardrails']['failed_turns']}; "
          f"{summary['truncated_prompts']} prompts cut to the user LM's context -> {output_dir}")
    return output_dir


@hydra.main(version_base="1.3", config_path="../conf/simulate", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
