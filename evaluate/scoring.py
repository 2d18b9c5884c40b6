"""Per-token negative log-likelihood of labelled examples, batched by length.

`score_examples` returns one NLL per target token (float64 on the host) with the example it came
from: every metric is then a sum over tokens divided by a count of tokens (evaluate.metrics), never
an average of per-batch means. Examples are sorted by length and packed into batches of at most
`max_tokens_per_batch` padded tokens, right-padded (core.runtime's length_batches and right_padded:
a causal model never looks right, and the attention mask hides the pad from nothing that is scored). Logits are upcast to float32 before the
log-softmax, so a bf16 model loses precision only inside the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from core.runtime import length_batches, right_padded
from data_prep.chat_format import IGNORE_INDEX


@dataclass
class TokenScores:
    nll: np.ndarray          # float64 per target token
    example: np.ndarray      # int64: index (in the input list) of the example of each target token
    position: np.ndarray     # int64: position of the target token in its example
    forward_tokens: int      # real (unpadded) tokens that went through the model
    padded_tokens: int       # tokens including padding


@torch.inference_mode()
def score_examples(model, input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                   max_tokens_per_batch: int, max_batch_size: int, progress: bool = True) -> TokenScores:
    """NLL of every labelled token (labels != -100) of every example under `model` (a causal LM)."""
    device = next(model.parameters()).device
    vocab_rows = model.get_input_embeddings().num_embeddings
    largest = max((max(ids) for ids in input_ids if ids), default=0)
    if largest >= vocab_rows:
        raise ValueError(f"token id {largest} is outside the model's {vocab_rows}-row embedding matrix: "
                         "the tokenizer does not belong to this model")
    lengths = [len(ids) for ids in input_ids]
    nll, example, position = [], [], []
    padded = 0
    batches = length_batches(lengths, max_tokens_per_batch, max_batch_size)
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
        ids, mask = right_padded([input_ids[i] for i in batch])
        targets, _ = right_padded([labels[i] for i in batch], IGNORE_INDEX)
        padded += ids.numel()
        if (targets[:, 0] != IGNORE_INDEX).any():
            raise ValueError("an example's first token is labelled: nothing precedes it to predict it")
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        # Position t is predicted by the logits at t - 1.
        rows, cols = (targets[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
        picked = logits[rows.to(device), cols.to(device)].float()
        token_nll = torch.nn.functional.cross_entropy(picked, targets[rows, cols + 1].to(device), reduction="none")
        nll.append(token_nll.double().cpu().numpy())
        example.append(np.asarray(batch, dtype=np.int64)[rows.numpy()])
        position.append(cols.numpy() + 1)
    empty_f, empty_i = np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
    return TokenScores(nll=np.concatenate(nll) if nll else empty_f,
                       example=np.concatenate(example) if example else empty_i,
                       position=np.concatenate(position).astype(np.int64) if position else empty_i,
                       forward_tokens=sum(lengths), padded_tokens=padded)
