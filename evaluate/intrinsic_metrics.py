"""The paper's six intrinsic metrics of user simulators (its Section 3; what it states and what we
chose: docs/reproduction.md, section 6), one function each. All return percentages (0-100), as
the paper reports them.

    first_turn_diversity     distinct 1-grams and 100 x (1 - mean pairwise Jaccard) of first turns
    intent_decomposition     1-gram overlap of user turns with their intent, stopwords removed
    dialogue_termination     precision / recall / F1 of predicting <|endconversation|> where a real
                             conversation ended (`termination_decisions` gets them from a model)
    naturalness              an AI-text detector's mean probability that a first turn is human
    role_adherence           % of conversations in which the user kept its role (did not reveal
                             the answer to an assistant that hedged); judged, see evaluate.judges
    intent_adherence         % in which the user kept to its intent when the assistant diverted

The paper names the metrics but not every formula; where it is silent our choice is documented at
the function, and the table notes say that the paper's numbers may be computed differently.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np
import torch

from core.runtime import length_batches, right_padded
from evaluate.guardrails import intent_body
from evaluate.lexical import content_words, unigrams


# ---- 1. first-turn diversity ---------------------------------------------------------------------
def first_turn_diversity(first_turns: Sequence[str]) -> dict:
    """Lexical diversity of N first turns.

    distinct_1: 100 x distinct unigrams / all unigrams, over all turns pooled.
    jaccard_diversity: 100 x (1 - mean Jaccard similarity of the unigram sets of every pair of
        turns); two turns without words count as identical. The headline number: it is the reading
        of the paper's scale (94.55 for UserLM-8b, 94.01 for humans) that fits, since pooled
        distinct-1 over 2,000 turns is far lower.
    """
    tokens = [unigrams(t) for t in first_turns]
    sets = [frozenset(t) for t in tokens]
    total = sum(len(t) for t in tokens)
    similarities = [len(a & b) / len(a | b) if a | b else 1.0 for a, b in itertools.combinations(sets, 2)]
    return {"turns": len(first_turns), "pairs": len(similarities),
            "distinct_1": 100.0 * len(set().union(*sets)) / total if total else 0.0,
            "jaccard_diversity": 100.0 * (1.0 - float(np.mean(similarities))) if similarities else None}


# ---- 2. intent decomposition ---------------------------------------------------------------------
def intent_decomposition(conversations: Sequence[tuple[str, Sequence[str]]], intent_prefix: str) -> dict:
    """How much of the intent the user turns repeat (lower: the intent is unfolded, not recited).

    conversations: (intent, [user turn texts]). Per user turn: 100 x |T & I| / |T|, with T the
    turn's content words and I the intent's (its fixed opening `intent_prefix` removed first); a
    turn without content words counts 0. The value is the mean over all user turns.
    """
    overlaps = []
    for intent, turns in conversations:
        intent_words = content_words(intent_body(intent, intent_prefix))
        for turn in turns:
            words = content_words(turn)
            overlaps.append(100.0 * len(words & intent_words) / len(words) if words else 0.0)
    return {"user_turns": len(overlaps), "overlap": float(np.mean(overlaps)) if overlaps else None}


# ---- 3. dialogue termination ---------------------------------------------------------------------
def dialogue_termination(predicted_end: Sequence[bool], real_end: Sequence[bool]) -> dict:
    """Precision, recall and F1 (in %) of predicting the end where the conversation really ended.

    One decision per user-turn position: predicted_end[i] says the model would send
    <|endconversation|> there, real_end[i] that the real user did."""
    predicted, real = np.asarray(predicted_end, bool), np.asarray(real_end, bool)
    true_positive = int((predicted & real).sum())
    precision = true_positive / predicted.sum() if predicted.sum() else 0.0
    recall = true_positive / real.sum() if real.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"positions": int(predicted.size), "real_ends": int(real.sum()), "predicted_ends": int(predicted.sum()),
            "true_positives": true_positive, "precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1}


@torch.inference_mode()
def termination_decisions(model, protocol, conversations: Sequence[dict], max_seq_len: int,
                          max_tokens_per_batch: int, max_batch_size: int) -> dict:
    """The model's decision at every user-turn position after the first of real conversations.

    conversations: data_prep records {intent, turns, ended}. Each is teacher-forced in one pass
    (protocol.examples, per_conversation). At user turn k >= 2 (the end target of an ended
    conversation included) the turn's body opens with "\\n"; the model predicts the end when
    <|endconversation|> is its most likely next token there (greedy), and `end_probability` keeps
    the probability. Positions whose body does not open with a lone "\\n" token are counted and
    skipped. `positions` names each decision: (conversation index, user turn index).
    userlm protocol with <|endconversation|> in the vocabulary only.
    """
    tokenizer = protocol.tokenizer
    end_id = tokenizer.convert_tokens_to_ids("<|endconversation|>")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    examples, owners = [], []
    for number, row in enumerate(conversations):
        for example in protocol.examples(row["intent"], row["turns"], row["ended"], "per_conversation", max_seq_len):
            examples.append(example)
            owners.append(number)
    predicted, real, probability, positions, skipped = [], [], [], [], 0
    device = next(model.parameters()).device
    for batch in length_batches([len(e.input_ids) for e in examples], max_tokens_per_batch, max_batch_size):
        ids, mask = right_padded([examples[i].input_ids for i in batch])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for row, i in enumerate(batch):
            example, row_record = examples[i], conversations[owners[i]]
            last_turn = sum(t["role"] == "user" for t in row_record["turns"])   # index of the end target
            for turn, position in _turn_starts(example.target_turn):
                if turn == 0:
                    continue                              # before the first turn nobody ends
                if example.input_ids[position:position + 1] != newline:
                    skipped += 1
                    continue
                probs = torch.softmax(logits[row, position], dim=-1)
                predicted.append(int(probs.argmax()) == end_id)
                probability.append(float(probs[end_id]))
                real.append(row_record["ended"] and turn == last_turn)
                positions.append((owners[i], turn))
    return {"predicted_end": predicted, "real_end": real, "end_probability": probability, "positions": positions,
            "skipped_positions": skipped}


def _turn_starts(target_turn: Sequence[int]) -> list[tuple[int, int]]:
    """(user turn, position of its first target token) for each turn that begins in this example."""
    starts, previous = [], -1
    for position, turn in enumerate(target_turn):
        if turn >= 0 and turn != previous:
            starts.append((turn, position))
        previous = turn
    return starts


# ---- 4. naturalness ------------------------------------------------------------------------------
@torch.inference_mode()
def naturalness(texts: Sequence[str], detector, detector_tokenizer, human_label: str,
                batch_size: int, max_length: int) -> dict:
    """100 x the mean probability, under an AI-text detector (a sequence-classification model),
    that each text was written by a human. `human_label` names the detector's human class
    (config.id2label; openai-community/roberta-base-openai-detector calls it "Real")."""
    labels = {str(name): int(index) for index, name in detector.config.id2label.items()}
    if human_label not in labels:
        raise ValueError(f"naturalness.human_label={human_label!r}: the detector's labels are {sorted(labels)}")
    human = labels[human_label]
    device = next(detector.parameters()).device
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = detector_tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt").to(device)
        scores += torch.softmax(detector(**batch).logits.float(), dim=-1)[:, human].tolist()
    return {"texts": len(scores), "human_probability": 100.0 * float(np.mean(scores)) if scores else None}


# ---- 5 and 6. adherence --------------------------------------------------------------------------
def adherence(verdicts: Sequence[bool | None]) -> dict:
    """100 x the share of judged conversations in which the user adhered (None: no usable verdict,
    left out and counted)."""
    judged = [v for v in verdicts if v is not None]
    return {"conversations": len(verdicts), "judged": len(judged), "unjudged": len(verdicts) - len(judged),
            "adherence": 100.0 * sum(judged) / len(judged) if judged else None}
