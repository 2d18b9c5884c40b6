"""One model runtime for every stage: device and dtype, loading, stop tokens, the generation pad,
batched generation and length-bucketed padded batches.

    device = runtime.resolve_device("auto")            # cuda when present, else cpu
    dtype = runtime.resolve_dtype("auto", device)      # bfloat16 on a CUDA device that supports it, else float32
    tokenizer = runtime.load_tokenizer(name, revision, trust_remote_code)
    model = runtime.load_causal_lm(name, "auto", "auto", revision, trust_remote_code)   # eval mode, on its device
    stops = runtime.stop_token_ids(tokenizer, model)   # + extra_tokens, e.g. (EOT, END_OF_TEXT) for UserLM's format
    pad = runtime.generation_pad_id(tokenizer, stops, pad_token)
    runtime.generate_batch(model, pad, prompts, stops, generate_kwargs)   # [(new ids before the stop, stopped)]

Dtypes have one vocabulary, `auto | bfloat16 | float16 | float32`. Stop tokens follow one rule: the
tokenizer's EOS, the model's generation_config EOS ids, and the caller's extra tokens where the
vocabulary has them. The generation pad is never a stop token: the tokenizer's pad when it is not
one (an instruct model such as Qwen-Instruct ships pad = EOS), else the configured pad token when
the vocabulary has it, else the lowest id that is not a stop. The pad only fills masked positions
left of a prompt and the tail of a row that already stopped (cut at its first stop), so its
identity never reaches an output.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- device and dtype ----------------------------------------------------------------------------
def resolve_device(device: str | torch.device) -> torch.device:
    """auto: cuda when a GPU is present, else cpu; anything else as torch names it ("cuda:1")."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """auto: bfloat16 on a CUDA device with bf16 support, else float32 (bf16 on CPUs is ~3x slower)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda = resolve_device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---- loading -------------------------------------------------------------------------------------
def load_tokenizer(name_or_path, revision: str | None = None, trust_remote_code: bool = False):
    return AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def load_model(auto_class, name_or_path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               revision: str | None = None, trust_remote_code: bool = False):
    """A model of `auto_class` (AutoModelForCausalLM, AutoModelForSequenceClassification, ...) for
    inference: in `dtype` on `device`, eval mode. The weights load straight onto the device
    (device_map), never as a whole copy in host memory first (16 GB for an 8B model in bf16)."""
    device = resolve_device(device)
    model = auto_class.from_pretrained(name_or_path, revision=revision, dtype=resolve_dtype(dtype, device),
                                       device_map=device, trust_remote_code=trust_remote_code)
    return model.eval()


def load_causal_lm(name_or_path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
                   revision: str | None = None, trust_remote_code: bool = False):
    return load_model(AutoModelForCausalLM, name_or_path, dtype, device, revision, trust_remote_code)


# ---- stop tokens and the generation pad ----------------------------------------------------------
def token_ids(tokenizer, tokens: Sequence[str], what: str) -> list[int]:
    """The ids of `tokens`, each of which must be in the vocabulary (`what` names the setting)."""
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocabulary]
    if missing:
        raise ValueError(f"{what}: {missing} not in {tokenizer.name_or_path}'s vocabulary")
    return [vocabulary[t] for t in tokens]


def stop_token_ids(tokenizer, model, extra_tokens: Sequence[str] = ()) -> list[int]:
    """The tokens that end a generated turn: the tokenizer's EOS, the model's generation_config EOS
    ids, and those of `extra_tokens` the vocabulary has; sorted."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    vocabulary = tokenizer.get_vocab()
    ids |= {vocabulary[t] for t in extra_tokens if t in vocabulary}
    return sorted(i for i in ids if i is not None)


def generation_pad_id(tokenizer, stop_ids: Sequence[int], pad_token: str | None = None) -> int:
    """The pad of left-padded generation, never a stop token (the module docstring says why any
    such id is safe): the tokenizer's pad, else `pad_token`, else the lowest id that is no stop."""
    stops = set(stop_ids)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in stops:
        return tokenizer.pad_token_id
    configured = tokenizer.get_vocab().get(pad_token) if pad_token else None
    if configured is not None and configured not in stops:
        return configured
    return next(i for i in range(len(tokenizer) + 1) if i not in stops)


# ---- batched generation --------------------------------------------------------------------------
def generate_batch(model, pad_token_id: int, prompts: Sequence[Sequence[int]], stop_token_ids: Sequence[int],
                   generate_kwargs: dict, logits_processor: LogitsProcessor | None = None
                   ) -> list[tuple[list[int], bool]]:
    """Generate from token-id prompts in one left-padded batch: per prompt (new ids before the first
    stop token, whether a stop token ended it). The pad must not be a stop token (generation_pad_id)."""
    if pad_token_id is None or pad_token_id in stop_token_ids:
        raise ValueError("generation needs a pad token that is not a stop (EOS) token: use generation_pad_id")
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_token_id] * (width - len(p)) + list(p) for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    processors = LogitsProcessorList([logits_processor] if logits_processor else [])
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                                eos_token_id=list(stop_token_ids), pad_token_id=pad_token_id, **generate_kwargs)
    results = []
    for row in output[:, width:].tolist():
        stop = next((k for k, token in enumerate(row) if token in stop_token_ids), None)
        results.append((row[:stop], stop is not None))
    return results


def in_length_batches(prompts: Sequence[Sequence[int]], batch_size: int, generate: Callable[[list[int]], list]
                      ) -> list:
    """Call `generate(indices)` on batches of prompts of similar length (less padding); results in
    the order of `prompts`."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        for i, result in zip(chunk, generate(chunk)):
            results[i] = result
    return results


# ---- padded batches for scoring ------------------------------------------------------------------
def length_batches(lengths: Sequence[int], max_tokens_per_batch: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, each at most max_tokens_per_batch padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        # Sorted longest first: the batch's padded width is its first example's length.
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > max_tokens_per_batch or len(current) == max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def right_padded(rows: Sequence[Sequence[int]], value: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` as one right-padded long tensor (padding = `value`) and its attention mask. A causal
    model never looks right, so right padding changes nothing a real position computes."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, :len(tokens)] = 1
    return ids, mask
