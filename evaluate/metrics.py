"""Perplexity from per-token NLLs: totals, breakdowns and a bootstrap interval over conversations.

Every perplexity here is exp(sum of token NLLs / number of tokens) over the tokens in question.
"""

from __future__ import annotations

import math

import numpy as np


def summary(nll: np.ndarray) -> dict:
    """Target tokens, summed and mean NLL, and perplexity of a set of token NLLs."""
    total, count = float(np.sum(nll, dtype=np.float64)), int(nll.size)
    mean = total / count if count else float("nan")
    return {"target_tokens": count, "nll_sum": total, "mean_nll": mean, "ppl": math.exp(mean) if count else None}


def bootstrap_interval(nll: np.ndarray, conversation: np.ndarray, num_conversations: int, samples: int,
                       confidence: float, seed: int) -> list[float]:
    """Percentile interval of the perplexity when whole conversations are resampled with replacement."""
    nll_per = np.bincount(conversation, weights=nll, minlength=num_conversations)
    tokens_per = np.bincount(conversation, minlength=num_conversations).astype(np.float64)
    rng = np.random.default_rng(seed)
    ppl = np.empty(samples)
    chunk = max(1, 2_000_000 // max(num_conversations, 1))  # bound the index matrix's memory
    for start in range(0, samples, chunk):
        draws = rng.integers(0, num_conversations, size=(min(chunk, samples - start), num_conversations))
        ppl[start:start + len(draws)] = np.exp(nll_per[draws].sum(axis=1) / tokens_per[draws].sum(axis=1))
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(ppl, [tail, 100.0 - tail])
    return [float(low), float(high)]


def perplexity_report(nll: np.ndarray, conversation: np.ndarray, user_turn: np.ndarray, is_end: np.ndarray,
                      num_conversations: int, max_turn: int, bootstrap) -> dict:
    """The headline numbers and the breakdowns of a scored evaluation set.

    user_turn: 0-based index of each token's user turn (the end token: the index after the last turn).
    is_end: True for tokens of the end-of-conversation target.
    max_turn: turns from this (1-based) number on are pooled in one "<max_turn>+" bucket.
    bootstrap: samples, confidence, seed.
    """
    turn_number = np.minimum(user_turn + 1, max_turn)
    by_turn = {}
    for number in range(1, max_turn + 1):
        selected = (turn_number == number) & ~is_end
        if selected.any():
            by_turn[f"{number}+" if number == max_turn else str(number)] = summary(nll[selected])
    report = summary(nll)
    report["ppl_ci"] = (bootstrap_interval(nll, conversation, num_conversations, bootstrap.samples,
                                           bootstrap.confidence, bootstrap.seed) if nll.size else None)
    report["breakdown"] = {
        "first_turn": summary(nll[(user_turn == 0) & ~is_end]),
        "follow_up_turns": summary(nll[(user_turn > 0) & ~is_end]),
        "end_of_conversation": summary(nll[is_end]),
        "without_end_of_conversation": summary(nll[~is_end]),
        "by_turn": by_turn,
    }
    return report
