"""Training data: data_prep's examples -> rows (packed or not) -> each process's micro batches.

A *row* is a list of example indices whose tokens sit side by side in one sequence of at most
`max_seq_len` tokens. With packing, rows are filled best-fit-decreasing; each example keeps its own
position ids (0, 1, ...), which is all the model needs to keep examples apart: with no attention
mask, transformers builds a block-diagonal causal mask from position ids that restart
(masking_utils.find_packed_sequence_indices; tests/test_train_units.py checks the losses), and
flash-attention uses them for its variable-length kernel once train.model has flattened the micro
batch's rows into one (tests/test_train_gpu_recipe.py). Targets are shifted inside each example,
so no token is ever trained to predict the next example's first token.

Every process builds the same plan from the same lengths and seed, so each knows the whole global
batch (and its target-token count) without communication; the data position of a run is just its
step number, which makes resuming exact.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from core.prepared import load_examples
from data_prep.chat_format import IGNORE_INDEX

REQUIRED_COLUMNS = ("conversation_hash", "input_ids", "labels", "num_tokens", "num_target_tokens")
PAD_TO_MULTIPLE_OF = 8  # rows are padded to a multiple of 8 tokens (tensor-core friendly shapes)


@dataclass
class Split:
    """One split of data_prep's output, with the per-example numbers that planning needs."""
    examples: datasets.Dataset     # input_ids, labels
    lengths: np.ndarray            # tokens per example
    targets: np.ndarray            # trained-on tokens per example, after shifting labels


def load_split(data_dir: Path, split: str, limit: int | None, max_seq_len: int) -> Split:
    examples = load_examples(data_dir, split, limit)
    missing = [c for c in REQUIRED_COLUMNS if c not in examples.column_names]
    if missing:
        raise ValueError(f"{data_dir / split}: missing column(s) {missing}; is it data_prep's output?")
    if len(examples) == 0:
        raise ValueError(f"{data_dir / split} has no examples")
    table = examples.with_format("arrow").select_columns(["num_tokens", "num_target_tokens", "labels"])[:]
    lengths = table.column("num_tokens").to_numpy().astype(np.int64)
    # A label on an example's first token has nothing to be predicted from: shifting drops it.
    first_is_target = pc.not_equal(pc.list_element(table.column("labels"), 0), IGNORE_INDEX).to_numpy(False)
    targets = table.column("num_target_tokens").to_numpy().astype(np.int64) - first_is_target
    too_long = np.flatnonzero(lengths > max_seq_len)
    if len(too_long):
        i = int(too_long[0])
        raise ValueError(f"{data_dir / split}: example {i} (conversation {examples[i]['conversation_hash']}) has "
                         f"{lengths[i]} tokens > data.max_seq_len={max_seq_len} ({len(too_long)} such examples); "
                         "raise data.max_seq_len or rerun data_prep with a smaller max_seq_len")
    return Split(examples.select_columns(["input_ids", "labels"]), lengths, targets)


def pack(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each example, longest first, goes into the fullest row it fits in.

    Rows are found by remaining capacity (a sorted list of the distinct capacities in use), so a
    million examples pack in seconds. Deterministic: ties are broken by example index.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    rows: list[list[int]] = []
    free_levels: list[int] = []                        # sorted remaining capacities with open rows
    rows_at: dict[int, list[int]] = defaultdict(list)  # remaining capacity -> open row ids
    for i in order:
        need = int(lengths[i])
        at = bisect.bisect_left(free_levels, need)
        if at == len(free_levels):
            row, left = len(rows), capacity - need
            rows.append([i])
        else:
            level = free_levels[at]
            row = rows_at[level].pop()
            if not rows_at[level]:
                del free_levels[at]
            rows[row].append(i)
            left = level - need
        if left > 0:
            if not rows_at[left]:
                bisect.insort(free_levels, left)
            rows_at[left].append(row)
    return rows


def make_rows(lengths: np.ndarray, capacity: int, packing: bool) -> list[list[int]]:
    return pack(lengths, capacity) if packing else [[i] for i in range(len(lengths))]


def padded_length(longest: int, max_seq_len: int) -> int:
    return min(-(-max(longest, 1) // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF, max_seq_len)


@dataclass
class BatchArithmetic:
    world_size: int
    micro_batch_size: int
    accumulation: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.micro_batch_size * self.accumulation

    def __str__(self) -> str:
        return (f"global batch {self.global_batch_size} rows = {self.world_size} processes x "
                f"{self.micro_batch_size} rows per micro batch x {self.accumulation} accumulation steps")


def batch_arithmetic(global_batch_size: int, micro_batch_size: int, world_size: int,
                     round_global_batch: bool) -> BatchArithmetic:
    """Derive gradient accumulation so that world x micro x accumulation == global batch, exactly."""
    per_pass = world_size * micro_batch_size
    if global_batch_size % per_pass == 0:
        return BatchArithmetic(world_size, micro_batch_size, global_batch_size // per_pass)
    if not round_global_batch:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is not a multiple of {world_size} processes x "
            f"train.micro_batch_size={micro_batch_size} = {per_pass}; change one of them, or set "
            f"train.round_global_batch=true to use {max(1, round(global_batch_size / per_pass)) * per_pass}")
    return BatchArithmetic(world_size, micro_batch_size, max(1, round(global_batch_size / per_pass)))


class Plan:
    """Which rows every process runs at every step: the same on every process, from a seed.

    Each epoch shuffles the rows (seed, epoch); step s of the epoch takes the next global batch of
    rows, sorts them by length (so a micro batch holds rows of similar length and pads little),
    and deals consecutive micro batches to processes: micro step m of process k is chunk
    m * world + k. Rows that do not fill a last global batch are left out of that epoch (logged).
    """

    def __init__(self, split: Split, rows: list[list[int]], arithmetic: BatchArithmetic, seed: int,
                 max_seq_len: int):
        self.split, self.rows, self.arithmetic, self.seed = split, rows, arithmetic, seed
        self.max_seq_len = max_seq_len
        self._epoch_order: tuple[int, np.ndarray | None] = (-1, None)
        self.row_tokens = np.array([split.lengths[r].sum() for r in rows], dtype=np.int64)
        self.row_targets = np.array([split.targets[r].sum() for r in rows], dtype=np.int64)
        self.row_squares = np.array([(split.lengths[r] ** 2).sum() for r in rows], dtype=np.int64)  # attention cost
        self.steps_per_epoch = len(rows) // arithmetic.global_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(rows)} rows cannot fill one global batch of {arithmetic.global_batch_size}: "
                             "lower train.global_batch_size")

    @property
    def dropped_rows_per_epoch(self) -> int:
        return len(self.rows) - self.steps_per_epoch * self.arithmetic.global_batch_size

    def fingerprint(self) -> str:
        """Identifies the data order; a checkpoint resumes only onto the same one."""
        digest = hashlib.sha256(np.array([len(self.rows), self.seed, self.arithmetic.global_batch_size,
                                          self.max_seq_len], dtype=np.int64).tobytes())
        digest.update(np.concatenate([np.array(r, dtype=np.int64) for r in self.rows]).tobytes())
        return digest.hexdigest()[:16]

    def step_rows(self, step: int) -> np.ndarray:
        """Row ids of global step `step` (0-based over the whole run), sorted by length."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:
            self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        order = self._epoch_order[1]
        size = self.arithmetic.global_batch_size
        chosen = order[index * size:(index + 1) * size]
        return chosen[np.argsort(-self.row_tokens[chosen], kind="stable")]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """This process's micro batches (accumulation of them, micro_batch_size rows each)."""
        a = self.arithmetic
        chunks = self.step_rows(step).reshape(a.accumulation * a.world_size, a.micro_batch_size)
        return [chunks[m * a.world_size + rank] for m in range(a.accumulation)]

    def step_statistics(self, step: int) -> dict:
        """Tokens, target tokens and padded size of a whole global step (every process)."""
        rows = self.step_rows(step)
        chunks = rows.reshape(-1, self.arithmetic.micro_batch_size)
        padded = sum(padded_length(int(self.row_tokens[c].max()), self.max_seq_len) * len(c) for c in chunks)
        tokens = int(self.row_tokens[rows].sum())
        return {"tokens": tokens, "target_tokens": int(self.row_targets[rows].sum()), "padded_tokens": padded,
                "packing_efficiency": tokens / padded, "squared_lengths": int(self.row_squares[rows].sum())}

    def epoch_statistics(self) -> dict:
        steps = [self.step_statistics(s) for s in range(self.steps_per_epoch)]
        tokens, padded = sum(s["tokens"] for s in steps), sum(s["padded_tokens"] for s in steps)
        return {"rows": len(self.rows), "examples": int(sum(len(r) for r in self.rows)),
                "steps_per_epoch": self.steps_per_epoch, "dropped_rows_per_epoch": self.dropped_rows_per_epoch,
                "tokens_per_epoch": tokens, "padded_tokens_per_epoch": padded,
                "target_tokens_per_epoch": sum(s["target_tokens"] for s in steps),
                "packing_efficiency": tokens / padded if padded else 0.0}


def evaluation_batches(split: Split, rows: list[list[int]], micro_batch_size: int, world_size: int,
                       rank: int) -> list[list[list[int]]]:
    """This process's share of the validation rows, in micro batches.

    Every process gets the same number of micro batches (ZeRO-3 gathers parameters collectively in
    each forward pass, so an uneven count would hang): the last ones are topped up with empty rows,
    which carry no targets.
    """
    lengths = [int(split.lengths[r].sum()) for r in rows]
    ordered = [rows[i] for i in sorted(range(len(rows)), key=lambda i: -lengths[i])]
    per_round = micro_batch_size * world_size
    ordered += [[]] * (-len(ordered) % per_round)
    chunks = [ordered[i:i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]
    return chunks[rank::world_size]


def collate(split: Split, rows, pad_id: int, max_seq_len: int) -> dict[str, torch.Tensor]:
    """Rows of example indices -> input_ids, position_ids and (already shifted) targets.

    targets[t] is the token that position t must predict (IGNORE_INDEX where nothing is trained):
    labels shifted by one *inside each example*, so an example's last position predicts nothing.
    Padding sits at the end of a row and continues the positions of the row's last example: a row
    of one example and padding then reads as one sequence, so sdpa keeps its mask-free causal
    kernel for unpacked micro batches (restarting positions would make every padded row look
    packed); the padding's own attention is never trained on.
    """
    indices = [int(i) for row in rows for i in row]
    fetched = split.examples[indices] if indices else {"input_ids": [], "labels": []}
    lookup = dict(zip(indices, zip(fetched["input_ids"], fetched["labels"])))
    width = padded_length(max((sum(int(split.lengths[i]) for i in row) for row in rows), default=1), max_seq_len)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, labels = lookup[int(i)]
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            position_ids[r, at:at + n] = torch.arange(n)
            targets[r, at:at + n - 1] = torch.tensor(labels[1:])
            at += n
        last = n if row else 0  # positions of the last example, or of nothing
        position_ids[r, at:] = torch.arange(last, last + width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
