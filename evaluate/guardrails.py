"""The paper's four generation guardrails for user simulation (its Appendix D.1; what it states and
what we chose: docs/reproduction.md, section 8).

1. first_word       forbid an assistant-like first word ("I", "You", "Here": config) by logits processing
2. end_conversation forbid <|endconversation|> until the caller allows the user to end
3. length           resample a turn of more than `max_words` or fewer than `min_words` words
4. repetition       resample a turn that repeats an earlier user turn or copies the intent verbatim

1 and 2 act while a turn is sampled (`TurnGuard`, a transformers LogitsProcessor); 3 and 4 judge a
finished turn (`turn_violations`) and the simulator resamples it, up to a retry budget per turn.

Counting. A logits guardrail *intervenes* on a turn when, at some step, a token it masked was inside
the sampler's nucleus (top-p under the temperature; the argmax when greedy): without the guardrail
that token could have been drawn there. The probability mass it removed is recorded as well. A
resampling guardrail intervenes on a turn when it rejected at least one sample of it.
`guardrail_report` turns the per-turn records into the rates that every run reports.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from transformers import LogitsProcessor

GUARDRAILS = ("first_word", "end_conversation", "length", "repetition")
LETTERS = re.compile(r"[^\W\d_]+")      # a run of letters: what a "word" is for the first-word ban
NOT_WORD = re.compile(r"[^\w\s]+")      # punctuation, dropped when comparing turns


# ---- 1. first word -------------------------------------------------------------------------------
class FirstWordBan:
    """Which next tokens would make the turn's first word one of `banned_words` (case-sensitive).

    The first word is the first run of letters after leading whitespace (a turn starts with "\\n");
    it is complete once a non-letter follows it ("I'm" -> "I", "Here," -> "Here") or the turn ends.
    Tokens are analysed by their decoded text, so a banned word split over several tokens ("He" +
    "re"), fused with its newline ("\\nI") or followed by the end of turn is caught: while the letters
    generated so far form a prefix of a banned word, the tokens that would complete it are masked.
    Lowercase "i" is a common human opening and stays allowed.
    """

    def __init__(self, tokenizer, banned_words: Sequence[str]):
        self.banned = frozenset(banned_words)
        for word in self.banned:
            if not LETTERS.fullmatch(word):
                raise ValueError(f"guardrails.first_word.words: {word!r} is not a single word of letters")
        self.tokenizer = tokenizer
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        prefixes = {word[:n] for word in self.banned for n in range(len(word) + 1)}
        self.masks = {prefix: self._mask(texts, prefix) for prefix in prefixes}

    def _mask(self, texts: list[str], prefix: str) -> torch.Tensor:
        mask = torch.zeros(len(texts), dtype=torch.bool)
        for token_id, text in enumerate(texts):
            if not prefix:
                text = text.lstrip()
            letters = LETTERS.match(text)
            head = letters.group() if letters else ""
            if text and len(head) == len(text):
                continue                              # only letters: the word is still open
            if not prefix and not text:
                continue                              # whitespace before the first word
            mask[token_id] = prefix + head in self.banned
        return mask

    def state(self, generated_text: str) -> str | None:
        """The open first word so far ("" before it starts), or None once it can no longer be banned."""
        text = generated_text.lstrip()
        if not text:
            return ""
        letters = LETTERS.match(text)
        if letters is None or letters.end() < len(text):
            return None                               # starts with a non-letter, or the word is complete
        return text if text in self.masks else None  # not a prefix of a banned word: nothing to ban


def first_word(text: str) -> str | None:
    """A turn's first word: its first run of letters after leading whitespace (None if it starts otherwise)."""
    letters = LETTERS.match(text.lstrip())
    return letters.group() if letters else None


def first_word_rule(banned_words: Sequence[str]):
    """The first-word guardrail as a check of a finished turn, for samplers that cannot mask tokens
    (a served model): True when the turn opens with a banned word, the same words the mask bans."""
    banned = frozenset(banned_words)
    return lambda text: first_word(text) in banned


# ---- 1 + 2 while sampling: one logits processor --------------------------------------------------
@dataclass
class RowRecord:
    """What the logits guardrails (first_word, end_conversation) did to one sampled turn."""
    intervened: Counter = field(default_factory=Counter)
    removed_mass: Counter = field(default_factory=Counter)


class TurnGuard(LogitsProcessor):
    """Masks banned first words and <|endconversation|> per row of a left-padded generation batch.

    Runs before temperature and top-p (transformers applies custom processors first), so the sampler
    renormalises over the allowed tokens. `forbid_end[i]`: row i may not end the conversation.
    """

    def __init__(self, prompt_length: int, first_words: FirstWordBan | None, forbid_end: Sequence[bool],
                 end_token_id: int | None, stop_token_ids: Sequence[int], temperature: float, nucleus: float):
        self.prompt_length = prompt_length
        self.first_words = first_words
        self.forbid_end = torch.tensor(list(forbid_end), dtype=torch.bool)
        self.end_token_id = end_token_id
        self.stop_token_ids = list(stop_token_ids)
        self.temperature = temperature
        self.nucleus = nucleus  # top_p when sampling; 0 when greedy (only the argmax can be drawn)
        self.records = [RowRecord() for _ in forbid_end]
        self.first_word_open = [first_words is not None] * len(forbid_end)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length:]
        stops = torch.tensor(self.stop_token_ids, device=generated.device)
        running = ~torch.isin(generated, stops).any(dim=1)
        masks = {}
        if any(self.first_word_open):
            first_word = torch.zeros_like(scores, dtype=torch.bool)
            for row in range(scores.shape[0]):
                if self.first_word_open[row] and running[row]:
                    state = self.first_words.state(self.first_words.tokenizer.decode(generated[row]))
                    if state is None:
                        self.first_word_open[row] = False
                    else:
                        mask = self.first_words.masks[state]   # the tokenizer's ids; the model may have more rows
                        first_word[row, :len(mask)] = mask.to(scores.device)
            masks["first_word"] = first_word
        if self.end_token_id is not None and self.forbid_end.any():
            end = torch.zeros_like(scores, dtype=torch.bool)
            end[:, self.end_token_id] = self.forbid_end.to(scores.device) & running
            masks["end_conversation"] = end
        if not masks:
            return scores
        probs = torch.softmax(scores.float() / max(self.temperature, 1e-6), dim=-1)
        for name, mask in masks.items():
            for record, intervened, mass in zip(self.records, *self._measure(probs, mask)):
                record.intervened[name] |= intervened
                record.removed_mass[name] += mass
            scores = scores.masked_fill(mask, float("-inf"))
        return scores

    def _measure(self, probs: torch.Tensor, mask: torch.Tensor) -> tuple[list[bool], list[float]]:
        """Per row: was a masked token inside the nucleus, and the probability mass masked."""
        banned_mass = (probs * mask).sum(dim=1)
        most_likely_banned = probs.masked_fill(~mask, -1.0).max(dim=1, keepdim=True).values
        mass_above = (probs * (probs > most_likely_banned)).sum(dim=1)
        intervened = mask.any(dim=1) & (mass_above < max(self.nucleus, 1e-12))
        return intervened.tolist(), banned_mass.tolist()


# ---- 3 + 4 on a finished turn --------------------------------------------------------------------
def normalise(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: how turns are compared for repetition."""
    return " ".join(NOT_WORD.sub(" ", text.lower()).split())


def intent_body(intent: str, prefix: str) -> str:
    """The intent without its fixed opening ("You are a user chatting with ... to"), normalised."""
    text = normalise(intent)
    head = normalise(prefix)
    return text[len(head):].strip() if head and text.startswith(head) else text


@dataclass
class LengthRule:
    min_words: int
    max_words: int


def turn_violations(text: str, earlier_user_turns: Iterable[str], intent: str | None, length: LengthRule | None,
                    repetition_prefix: str | None) -> list[str]:
    """The resampling guardrails that a finished (non-ending) user turn breaks: [] when it passes.

    length: LengthRule or None (off). repetition_prefix: the intent's fixed opening, stripped before
    looking for the intent inside the turn; None turns the repetition guardrail off.
    """
    violations = []
    if length is not None:
        words = len(text.split())
        if words > length.max_words or words < length.min_words:
            violations.append("length")
    if repetition_prefix is not None:
        turn = normalise(text)
        repeats = any(turn == normalise(earlier) for earlier in earlier_user_turns)
        body = intent_body(intent, repetition_prefix) if intent else ""
        copies = bool(body) and f" {body} " in f" {turn} "
        if repeats or copies:
            violations.append("repetition")
    return violations


# ---- counting ------------------------------------------------------------------------------------
@dataclass
class TurnGuardrails:
    """Per-turn guardrail metadata, stored with every simulated user turn (over all its samples)."""
    attempts: int = 0                                            # samples drawn for this turn
    rejected: dict[str, int] = field(default_factory=dict)       # resampling guardrail -> samples rejected
    failed: list[str] = field(default_factory=list)              # guardrails the kept sample still breaks
    intervened: dict[str, bool] = field(default_factory=dict)    # guardrail -> intervened on some sample
    removed_mass: dict[str, float] = field(default_factory=dict)  # logits guardrail -> probability removed

    def add_sample(self, record: RowRecord, violations: list[str]) -> None:
        self.attempts += 1
        for name, value in record.intervened.items():
            self.intervened[name] = bool(self.intervened.get(name) or value)
        for name, mass in record.removed_mass.items():
            self.removed_mass[name] = self.removed_mass.get(name, 0.0) + mass
        for name in violations:
            self.rejected[name] = self.rejected.get(name, 0) + 1
            self.intervened[name] = True

    def to_dict(self) -> dict:
        return {"attempts": self.attempts, "rejected": dict(sorted(self.rejected.items())), "failed": self.failed,
                "intervened": dict(sorted(self.intervened.items())),
                "removed_mass": {k: round(v, 6) for k, v in sorted(self.removed_mass.items())}}


def guardrail_report(turns: Sequence[dict], enabled: dict[str, bool]) -> dict:
    """Rates of each guardrail's interventions over user turns (dicts from TurnGuardrails.to_dict).

    rate = turns on which the guardrail intervened / user turns generated (the end turns included).
    samples_rejected: samples a resampling check rejected (the kept one too when the budget ran out);
    failures: turns whose retry budget ran out with this guardrail still broken; mean_removed_mass:
    probability mass a logits guardrail masked, per turn.
    """
    n = len(turns)
    intervened, rejected, failures, mass = Counter(), Counter(), Counter(), Counter()
    for t in turns:
        intervened.update(name for name, value in t["intervened"].items() if value)
        rejected.update(t["rejected"])
        failures.update(t["failed"])
        mass.update(t["removed_mass"])
    failed_turns = sum(bool(t["failed"]) for t in turns)
    report = {"user_turns": n, "samples": sum(t["attempts"] for t in turns),
              "failed_turns": failed_turns, "failure_rate": _rate(failed_turns, n)}
    for name in GUARDRAILS:
        report[name] = {"enabled": enabled[name], "turns_intervened": intervened[name],
                        "rate": _rate(intervened[name], n), "samples_rejected": rejected[name],
                        "failures": failures[name], "mean_removed_mass": _rate(mass[name], n)}
    return report


def _rate(count: float, total: int) -> float:
    return round(count / total, 6) if total else 0.0
