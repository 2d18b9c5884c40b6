"""`python -m evaluate.perplexity`: held-out perplexity of user turns (the paper's first table).

    python -m evaluate.perplexity experiment=tiny model=outputs/tiny/model name=tiny-untrained
    python -m evaluate.perplexity experiment=paper model=microsoft/UserLM-8b dataset=prism intent=none
    python -m evaluate.perplexity experiment=paper model=meta-llama/Llama-3.2-1B-Instruct protocol=flipped_chat
    python -m evaluate.perplexity -m experiment=paper model=<m> dataset=wildchat,prism intent=none,task

Reads data_prep's conversations (<data dir>/conversations/<split>), re-tokenizes them for the model
with a prompting protocol (evaluate.protocols), scores every user-turn target token
(evaluate.scoring) and writes <output_dir>/<name>/<dataset>-<intent>.json:
    target_tokens, nll_sum, mean_nll, ppl = exp(nll_sum / target_tokens), ppl_ci (bootstrap over
    conversations), breakdown (first_turn, follow_up_turns, end_of_conversation,
    without_end_of_conversation, by_turn), end_token handling, counts, data fingerprint, resolved
    config, package versions. No timings: the same config on the same machine gives the same bytes.
A target token is every token of a user turn's body ("\\n" + text + <|eot_id|>, or <|im_end|> in chatml)
and of the end-of-conversation target; system, headers and assistant turns are context.
Under protocol userlm, a tokenizer without <|endconversation|> for a model whose embedding has
rows past the tokenizer's vocabulary (where this pipeline's training puts that token) draws a
warning: most likely a trained user LM scored with the base tokenizer by mistake, which scores its
end token as plain text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import hydra
import numpy as np
from tqdm import tqdm

from core import artifacts, runtime
from core.prepared import check_prepared, load_conversations
from data_prep.chat_format import END_CONVERSATION, USER
from evaluate.config import result_name  # (importing it registers the config schemas)
from evaluate.metrics import perplexity_report
from evaluate.protocols import make_protocol
from evaluate.scoring import score_examples

log = logging.getLogger(__name__)
COUNTS = ("examples", "truncated_examples", "target_tokens_in_truncated_examples", "forward_tokens", "padded_tokens")


def conversation_intent(cfg, row: dict, index: int) -> str | None:
    if cfg.intent == "none":
        return None
    if cfg.intent == "generic":
        return cfg.generic_intent
    if not row["intent"]:
        raise ValueError(f"conversation {index} ({row['conversation_hash']}) has no intent; intent=task needs one")
    return row["intent"]


def end_token_handling(cfg, tokenizer, model) -> tuple[bool, str]:
    """Whether the model has a trained row for <|endconversation|>, and how the end target is scored."""
    token_id = tokenizer.get_vocab().get(END_CONVERSATION)
    rows = model.get_input_embeddings().num_embeddings
    in_vocabulary = token_id is not None and token_id < rows
    if cfg.protocol == "userlm" and token_id is None and rows > len(tokenizer):
        log.warning("the tokenizer (%s) has no %s, but the model's embedding has %d rows past its %d tokens, "
                    "where training (train/run.py) adds that token: is this a trained user LM scored with the "
                    "base tokenizer? Its end token is scored as %s; pass the model's own tokenizer (tokenizer=null) "
                    "or the data directory's", cfg.tokenizer or cfg.model, END_CONVERSATION, rows - len(tokenizer),
                    len(tokenizer), cfg.missing_end_token)
    return in_vocabulary, "token" if in_vocabulary else cfg.missing_end_token


def data_fingerprint(data_dir: Path) -> dict:
    """What determines the conversations: data_prep's input files, intents, filters and split."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return {"fingerprint": artifacts.config_hash(manifest["format_version"], manifest["input"],
                                                 manifest["intents"]["sha256"], manifest["config"]["filters"],
                                                 manifest["config"]["split"]),
            "input": manifest["input"], "intents_sha256": manifest["intents"]["sha256"]}


def model_fingerprint(model) -> str:
    """What determines the model's scores: its hub commit, or for a local directory its files.

    Weight files are hashed by size and their first and last 16 MiB (a full hash of 16 GB of
    safetensors would cost a minute per run); small files (config, tokenizer) in full.
    """
    if getattr(model.config, "_commit_hash", None):
        return model.config._commit_hash
    digest = hashlib.sha256()
    for path in sorted(Path(model.config.name_or_path).iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        digest.update(f"{path.name}\x1f{size}\x1f".encode())
        with open(path, "rb") as f:
            if size <= 2 * 16 * 2**20:
                digest.update(f.read())
            else:
                digest.update(f.read(16 * 2**20))
                f.seek(-16 * 2**20, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:16]


def score_chunk(cfg, protocol, model, rows: list[dict], first: int) -> dict:
    """Flip conversations rows (numbered from `first`) into examples and score every target token."""
    examples, owner = [], []
    for index, row in enumerate(rows, start=first):
        for example in protocol.examples(conversation_intent(cfg, row, index), row["turns"], row["ended"],
                                         cfg.mode, cfg.max_seq_len):
            examples.append(example)
            owner.append(index)
    scores = score_examples(model, [e.input_ids for e in examples], [e.labels for e in examples],
                            cfg.max_tokens_per_batch, cfg.max_batch_size, progress=False)
    starts = np.cumsum([0] + [len(e.target_turn) for e in examples])[:-1]
    target_turn = np.concatenate([e.target_turn for e in examples] or [[]]).astype(np.int64)
    truncated = np.asarray([e.truncated for e in examples], dtype=bool)
    return {"nll": scores.nll, "conversation": np.asarray(owner, dtype=np.int64)[scores.example],
            "user_turn": target_turn[starts[scores.example] + scores.position],
            "examples": len(examples), "truncated_examples": int(truncated.sum()),
            "target_tokens_in_truncated_examples": int(truncated[scores.example].sum()),
            "forward_tokens": scores.forward_tokens, "padded_tokens": scores.padded_tokens}


def save_chunk(path: Path, arrays: dict) -> None:
    with artifacts.atomic_file(path) as temporary, open(temporary, "wb") as f:
        np.savez(f, **arrays)


def run(cfg) -> Path:
    """Score one model in one setting into <output_dir>/<name>/, holding that directory's lock."""
    result_dir = Path(cfg.output_dir) / (cfg.name or result_name(cfg.model, cfg.protocol))
    with artifacts.owned_directory(result_dir, "perplexity"):
        return score(cfg, result_dir)


def score(cfg, result_dir: Path) -> Path:
    # ---- config ------------------------------------------------------------------------------
    if cfg.dataset not in cfg.data_dirs:
        raise ValueError(f"dataset={cfg.dataset!r}: expected one of data_dirs {sorted(cfg.data_dirs)}")
    data_dir = check_prepared(cfg.data_dirs[cfg.dataset])
    name = result_dir.name
    out_path = result_dir / f"{cfg.dataset}-{cfg.intent}.json"
    config = artifacts.resolved_config(cfg)
    del config["overwrite"]  # what to do with an existing result, not how to compute one
    device = runtime.resolve_device(cfg.device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)

    # ---- data --------------------------------------------------------------------------------
    rows = load_conversations(data_dir, cfg.split, cfg.limit).select_columns(["conversation_hash", "intent", "turns", "ended"]).to_list()
    if not rows:
        raise ValueError(f"{data_dir}/conversations/{cfg.split} has no conversations")

    # ---- model, tokenizer, protocol ----------------------------------------------------------
    tokenizer = runtime.load_tokenizer(cfg.tokenizer or cfg.model, cfg.revision, cfg.trust_remote_code)
    model = runtime.load_causal_lm(cfg.model, dtype, device, cfg.revision, cfg.trust_remote_code)
    in_vocabulary, end_handling = end_token_handling(cfg, tokenizer, model)
    protocol = make_protocol(cfg.protocol, tokenizer, end_token=end_handling, pad_token=cfg.pad_token,
                             system_prompt=cfg.flipped_chat.system_prompt,
                             system_prompt_with_intent=cfg.flipped_chat.system_prompt_with_intent,
                             template_kwargs=cfg.flipped_chat.template_kwargs)
    print(f"{cfg.model}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype} on {device}; "
          f"protocol {cfg.protocol}, <|endconversation|> {end_handling}")
    # A result is reused only for the same config, model weights and data.
    fingerprint = {**data_fingerprint(data_dir), "model": model_fingerprint(model)}
    if out_path.exists() and not cfg.overwrite:
        previous = json.loads(out_path.read_text())
        if previous["config"] == config and previous["fingerprints"] == fingerprint:
            print(f"{out_path} exists with this config, model and data: nothing to do")
            return out_path
        raise FileExistsError(f"{out_path} holds a result of another config, model or data: "
                              "set overwrite=true or name=...")

    # ---- flip + score, a chunk of conversations at a time --------------------------------------
    # Chunks bound the memory of the token lists (the paper's per_turn set is 137k examples) and are
    # the unit of resumption: each scored chunk is saved in `partial` until the result is written.
    partial = out_path.parent / f".{out_path.stem}.partial-{artifacts.config_hash(config, fingerprint)}"
    partial.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(rows), desc="score", unit="conversation")
    chunks = []
    for first in range(0, len(rows), cfg.chunk_conversations):
        chunk_path = partial / f"{first:09d}.npz"
        chunk = rows[first:first + cfg.chunk_conversations]
        if not chunk_path.exists():
            save_chunk(chunk_path, score_chunk(cfg, protocol, model, chunk, first))
        chunks.append(dict(np.load(chunk_path)))
        progress.update(len(chunk))
    progress.close()
    merged = {key: np.concatenate([c[key] for c in chunks]) for key in ("nll", "conversation", "user_turn")}
    counts = {key: int(sum(c[key] for c in chunks)) for key in COUNTS}

    # ---- metrics -----------------------------------------------------------------------------
    num_user_turns = np.asarray([sum(t["role"] == USER for t in row["turns"]) for row in rows], dtype=np.int64)
    is_end = merged["user_turn"] == num_user_turns[merged["conversation"]]  # the target after the last user turn
    report = perplexity_report(merged["nll"], merged["conversation"], merged["user_turn"], is_end, len(rows),
                               cfg.max_turn, cfg.bootstrap)

    # ---- save --------------------------------------------------------------------------------
    result = {
        "model": {"name": name, "model": cfg.model, "revision": cfg.revision, "tokenizer": cfg.tokenizer or cfg.model,
                  "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).removeprefix("torch.")},
        "dataset": cfg.dataset, "split": cfg.split, "intent": cfg.intent, "protocol": cfg.protocol, "mode": cfg.mode,
        "end_token": {"in_vocabulary": in_vocabulary, "handling": end_handling,
                      "ended_conversations": sum(row["ended"] for row in rows)},
        **report,
        "counts": {"conversations": len(rows), **counts},
        "data": {"dir": str(data_dir), **data_fingerprint(data_dir)},
        "fingerprints": fingerprint,
        "config": config,
        "packages": artifacts.package_versions(),
    }
    artifacts.write_json(out_path, result)
    shutil.rmtree(partial)
    ci = report["ppl_ci"] or [float("nan")] * 2
    print(f"{name} {cfg.dataset}-{cfg.intent}: PPL {report['ppl']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] over "
          f"{report['target_tokens']:,} target tokens of {len(rows):,} conversations "
          f"({counts['forward_tokens']:,} forward tokens, {counts['truncated_examples']} truncated examples) -> {out_path}")
    return out_path


@hydra.main(version_base="1.3", config_path="../conf/perplexity", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
