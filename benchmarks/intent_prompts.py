"""Compare two intent stores for the same conversations (say, prompt v1's and v2's intents).

    # the hand-written v1 and v2 intents of 20 sample conversations (the table in docs/intents.md)
    python benchmarks/intent_prompts.py benchmarks/data/intents_v1_sample20.jsonl \\
        benchmarks/data/intents_v2_sample20.jsonl --out benchmarks/results/intent_prompts_sample20.json

    # a real LLM run on the first 2,000 WildChat rows: both prompts (each into its own store), then
    # the comparison, with the same data_prep overrides so that the conversations are the same
    OPENAI_API_KEY=... python -m data_prep.intents experiment=paper intents.backend=openai \\
        intents/prompt=v1 intents.path=outputs/paper/intents_v1.jsonl data.limit=2000
    OPENAI_API_KEY=... python -m data_prep.intents experiment=paper intents.backend=openai \\
        intents/prompt=v2 intents.path=outputs/paper/intents_v2.jsonl data.limit=2000
    python benchmarks/intent_prompts.py outputs/paper/intents_v1.jsonl outputs/paper/intents_v2.jsonl \\
        --out benchmarks/results/intent_prompts_wildchat2000.json experiment=paper data.limit=2000

The conversations are data_prep's selection (data_prep.pipeline.select_conversations) composed
with the trailing overrides (default: experiment=tiny, the embedded sample). Each store is read as
data_prep reads a hand-written file (one intent per conversation; a store holding two versions'
intents of one conversation is an error: keep each prompt's intents in a store of its own).
Compared: the conversations that both stores and the selection hold; every other row is counted
under `left_out` (not in the other store / not among the selected conversations).

Per store, over those conversations:
  mean_words          intent length in whitespace-separated words, the fixed opening ("You are a
                      user chatting with an assistant language model to", 11 words) included
  entity_share        % of intents that name at least one entity of their conversation, where an
                      entity is a token of the intent after the fixed opening (the word tokens of
                      evaluate.intrinsic_metrics) that (1) holds an uppercase letter ("Kenya",
                      "CSV", "DataFrame") or a digit next to letters ("Q3", "mp3"; a bare number
                      is a specific, not a name), (2) is not sentence-initial (not the first token,
                      nor the first after ".", "!" or "?"), (3) lowercased is not a stopword (the
                      metric's list), and (4) lowercased is one of the lowercased tokens of the
                      conversation's user turns; a possessive "'s" is dropped on both sides
                      ("Curie's" is "Curie"), and "C++" is the token "C"
  entities_per_intent the mean count of such tokens (each distinct token once per intent)
  decomposition       evaluate.intrinsic_metrics.intent_decomposition of the real (human) user
                      turns against the store's intents: % of a turn's content words found in
                      its intent, averaged over user turns (how much of the turns the intent
                      already says; the paper's human figure against its intents is 1.68)
Prints a table and writes the figures as JSON (--out).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core import artifacts  # noqa: E402
from data_prep.chat_format import INTENT_PREFIX  # noqa: E402
from data_prep.intents.store import read_intents  # noqa: E402
from evaluate.intrinsic_metrics import intent_decomposition  # noqa: E402
from evaluate.lexical import STOPWORDS, WORD, unigrams  # noqa: E402

SENTENCE_END = re.compile(r"[.!?]\s*$")


def intent_text(intent: str) -> str:
    """The intent after its fixed opening, case kept (the metric's intent_body lowercases)."""
    text = intent.strip()
    return text[len(INTENT_PREFIX):] if text.lower().startswith(INTENT_PREFIX.lower()) else text


def without_possessive(token: str) -> str:
    return token[:-2] if token.lower().endswith("'s") else token


def entities(intent: str, user_turns: list[str]) -> list[str]:
    """The distinct entity tokens of `intent` that its conversation's user turns hold (module
    docstring), in the order they appear."""
    text, found = intent_text(intent), []
    conversation = {without_possessive(word) for turn in user_turns for word in unigrams(turn)}
    for match in WORD.finditer(text):
        token = without_possessive(match.group())
        initial = not text[:match.start()].strip() or SENTENCE_END.search(text[:match.start()])
        name_like = any(c.isupper() for c in token) or (any(c.isdigit() for c in token)
                                                        and any(c.isalpha() for c in token))
        if (name_like and not initial and token.lower() not in STOPWORDS and token.lower() in conversation
                and token not in found):
            found.append(token)
    return found


def store_figures(intents: dict[str, str], user_turns_of: dict[str, list[str]]) -> dict:
    """The figures of one store over the conversations of `user_turns_of` (all in `intents`)."""
    hashes = sorted(user_turns_of)
    named = [entities(intents[h], user_turns_of[h]) for h in hashes]
    decomposition = intent_decomposition([(intents[h], user_turns_of[h]) for h in hashes], INTENT_PREFIX)
    return {"intents": len(hashes),
            "mean_words": sum(len(intents[h].split()) for h in hashes) / len(hashes),
            "entity_share": 100.0 * sum(bool(n) for n in named) / len(hashes),
            "entities_per_intent": sum(len(n) for n in named) / len(hashes),
            "decomposition": decomposition["overlap"], "user_turns": decomposition["user_turns"],
            "entities": {h: n for h, n in zip(hashes, named) if n}}


def compare(stores: dict[str, dict[str, str]], user_turns_of: dict[str, list[str]]) -> dict:
    """Figures of each store (label -> {conversation_hash: intent}) over the conversations all the
    stores and `user_turns_of` (conversation_hash -> user turn texts) hold; the rest counted."""
    common = set(user_turns_of).intersection(*stores.values())
    if not common:
        raise ValueError("no conversation is in every store and among the selected conversations: "
                         "were the stores made from the same data (the same data_prep overrides)?")
    left_out = {label: {"not_in_other_stores": len({h for h in intents if h in user_turns_of} - common),
                        "not_among_conversations": len(set(intents) - set(user_turns_of))}
                for label, intents in stores.items()}
    turns = {h: user_turns_of[h] for h in common}
    return {"conversations": len(common), "left_out": left_out,
            "stores": {label: store_figures(intents, turns) for label, intents in stores.items()}}


def table(result: dict) -> str:
    rows = [f"{'store':<10} {'intents':>7} {'words':>6} {'names an entity':>16} {'entities':>9} "
            f"{'decomposition':>14}"]
    for label, f in result["stores"].items():
        rows.append(f"{label:<10} {f['intents']:>7} {f['mean_words']:>6.2f} {f['entity_share']:>15.1f}% "
                    f"{f['entities_per_intent']:>9.2f} {f['decomposition']:>13.2f}%")
    return "\n".join(rows)


def user_turns_of_selection(overrides: list[str]) -> dict[str, list[str]]:
    """conversation_hash -> user turn texts of the conversations data_prep keeps under `overrides`."""
    from data_prep.pipeline import select_conversations
    from scripts.hydra_compose import compose_config
    kept = select_conversations(compose_config("data_prep", overrides)).kept().select_columns(
        ["conversation_hash", "turns"])
    return {h: [t["content"] for t in turns if t["role"] == "user"]
            for h, turns in zip(kept["conversation_hash"], kept["turns"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stores", nargs=2, type=Path, help="two intent stores (JSON Lines)")
    parser.add_argument("--labels", nargs=2, help="names in the table (default: the stores' file names)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "intent_prompts.json")
    parser.add_argument("overrides", nargs="*",
                        help="data_prep overrides selecting the conversations (default: experiment=tiny)")
    args = parser.parse_intermixed_args(argv)  # the overrides may follow --out
    overrides = args.overrides or ["experiment=tiny"]
    labels = args.labels or [path.stem for path in args.stores]
    if len(set(labels)) != 2:
        raise SystemExit(f"the two stores need different labels (--labels), got {labels}")
    result = compare({label: read_intents(path) for label, path in zip(labels, args.stores)},
                     user_turns_of_selection(overrides))
    result.update(stores_read={label: str(path) for label, path in zip(labels, args.stores)},
                  data_prep_overrides=overrides)
    print(f"{result['conversations']} conversations in both stores and data_prep's selection ({' '.join(overrides)})")
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_json(args.out, result)
    print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
