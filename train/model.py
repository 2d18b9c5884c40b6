"""The model side of training: tokenizer checks, model loading, embedding resize, the per-token
loss, export.

The loss runs inside the model's forward (enable_token_losses): through the output layer in
chunks of `model.loss_chunk_tokens` tokens (TokenLossHead; no full [tokens, vocab] logits, ZeRO-3
safe), and under flash-attention on the micro batch flattened into one row (transformers keeps
packed examples apart with flash-attention only for a batch of one row).

The tokenizer is the one data_prep wrote beside its examples (`<data>/tokenizer`): the token ids in
the data were made with it, so training must use it, and the model must agree with it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.utils import is_flash_attn_2_available
from transformers.utils.generic import is_flash_attention_requested

from core import artifacts, runtime
from data_prep.chat_format import END_CONVERSATION, IGNORE_INDEX, format_of, save_tokenizer

log = logging.getLogger(__name__)


def load_tokenizer(data_dir: Path):
    """data_prep's prepared tokenizer, checked: <|endconversation|>, one of the chat formats' templates
    (which names the format: userlm or chatml), its end of turn as EOS, a pad."""
    path = data_dir / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(path)
    problems = []
    chat_format = format_of(tokenizer)
    if END_CONVERSATION not in tokenizer.get_vocab():
        problems.append(f"no {END_CONVERSATION} token")
    if chat_format is None:
        problems.append("its chat template is neither data_prep.chat_format's userlm nor its chatml template")
    elif tokenizer.eos_token != chat_format.end_of_turn:
        problems.append(f"EOS is {tokenizer.eos_token!r}, not {chat_format.end_of_turn}")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        problems.append("no pad token distinct from EOS")
    if problems:
        raise ValueError(f"{path}: {'; '.join(problems)} (was it written by data_prep.chat_format.prepare_tokenizer?)")
    return tokenizer


def check_tokenizer_matches_model(tokenizer, model_cfg) -> int | None:
    """Every token of the model's own tokenizer (if it ships one) must keep its id in ours. Returns
    that tokenizer's length, the first id data_prep added (None: the model ships no tokenizer)."""
    try:
        base = AutoTokenizer.from_pretrained(model_cfg.name_or_path, revision=model_cfg.revision,
                                             trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        log.warning("model %s ships no loadable tokenizer (%s): token ids are not cross-checked, and only "
                    "embedding rows past the model's are taken as new", model_cfg.name_or_path, type(error).__name__)
        return None
    ours = tokenizer.get_vocab()
    moved = [(token, i, ours.get(token)) for token, i in base.get_vocab().items() if ours.get(token) != i]
    if moved:
        token, theirs, mine = moved[0]
        raise ValueError(f"the data's tokenizer does not match model {model_cfg.name_or_path}: {len(moved)} "
                         f"token(s) differ, e.g. {token!r} is {theirs} in the model's tokenizer and {mine} in "
                         "the data's; rerun data_prep with the model's tokenizer")
    return len(base)


def resolve_precision(precision: str) -> torch.dtype:
    """model.precision (train.config.Precision: auto | bf16 | fp32, the names accelerate and DeepSpeed
    use) as core.runtime's dtype, on the device accelerate gives a process (cuda when present)."""
    dtype = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[precision]
    return runtime.resolve_dtype(dtype, runtime.resolve_device("auto"))


def resolve_gradient_checkpointing(value: bool | None) -> bool:
    """model.gradient_checkpointing: null (auto) turns it on with a GPU, off on CPU."""
    return torch.cuda.is_available() if value is None else value


def resolve_attention(attn_implementation: str) -> str:
    if attn_implementation == "auto":
        return "flash_attention_2" if torch.cuda.is_available() and is_flash_attn_2_available() else "sdpa"
    return attn_implementation


def gathered(params, modifier_rank=None):
    """All of a ZeRO-3-partitioned parameter on every process for the block (no-op otherwise)."""
    if is_deepspeed_zero3_enabled():
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def resize_embeddings(model, vocab_size: int, first_new: int | None = None) -> int:
    """Give the tokens from `first_new` to `vocab_size` (the ones data_prep added) embedding rows
    that are the mean of the rows before them, growing the input and output embeddings where the
    model has fewer than `vocab_size` rows.

    The mean keeps a new token's logit in line with the others (a random row would start it as an
    outlier). A model may have more rows than its tokenizer has tokens (Qwen2.5 pads its matrix
    to a multiple of 128; those rows were never trained): a new token that lands on one of them is
    given the mean too, so `first_new` is the model's own tokenizer's length; None (no tokenizer
    shipped): the rows past the model's. transformers' resize already handles ZeRO-3 partitions;
    the mean is written with the full matrices gathered. Returns the number of rows set; rows past
    `vocab_size` are kept as they are.
    """
    embeddings = model.get_input_embeddings()
    with gathered([embeddings.weight]):
        old = embeddings.weight.shape[0]
    first = old if first_new is None else min(first_new, old)
    if first >= vocab_size:
        return 0
    if vocab_size > old:
        model.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    if not model.config.get_text_config().tie_word_embeddings:
        matrices.append(model.get_output_embeddings().weight)
    with gathered(matrices, modifier_rank=0), torch.no_grad():
        for weight in matrices:
            weight[first:vocab_size] = weight[:first].mean(dim=0, keepdim=True)
    return vocab_size - first


def load_model(model_cfg, tokenizer, dtype: torch.dtype, attn_implementation: str, first_new_token: int | None = None):
    """The base model, with embeddings for the tokenizer (mean rows for the tokens from
    `first_new_token` on: resize_embeddings) and the chat format's EOS and the pad in its configs.

    Under ZeRO-3 (an Accelerator with a ZeRO-3 DeepSpeedPlugin exists) the weights are partitioned
    across processes as they load.
    """
    model = AutoModelForCausalLM.from_pretrained(
        model_cfg.name_or_path, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code,
        dtype=dtype, attn_implementation=attn_implementation)
    added = resize_embeddings(model, len(tokenizer), first_new_token)
    log.info("embeddings: %d tokens (%d new, initialised to the mean of the others)", len(tokenizer), added)
    eot, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # the format's end of turn (load_tokenizer)
    model.config.eos_token_id, model.config.pad_token_id = eot, pad
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eot, pad
    model.config.use_cache = False  # training; the export turns it back on
    enable_token_losses(model, model_cfg.loss_chunk_tokens)
    return model


class _ChunkedTokenLosses(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T` against `targets`, `chunk` tokens at a time.

    No [tokens, vocab] tensor is kept between forward and backward: the backward pass recomputes
    each chunk's logits (one extra output-layer matmul) and forms d loss / d logits = (softmax -
    one-hot) x the incoming gradient chunk by chunk. The arithmetic of every chunk is the full
    path's (logits in the weight's dtype, softmax in fp32, the logit gradient cast back before the
    matmuls), so the two agree to float rounding; the weight gradient is summed over chunks in the
    weight's dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        for start in range(0, len(targets), chunk):
            logits = torch.nn.functional.linear(hidden[start:start + chunk], weight)
            losses[start:start + chunk] = torch.nn.functional.cross_entropy(
                logits.float(), targets[start:start + chunk], ignore_index=IGNORE_INDEX, reduction="none")
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, len(targets), ctx.chunk):
            h, t = hidden[start:start + ctx.chunk], targets[start:start + ctx.chunk]
            grad_logits = torch.softmax(torch.nn.functional.linear(h, weight).float(), dim=-1)
            trained = t != IGNORE_INDEX
            # - one-hot of the target where there is one; no data-dependent shapes (no device sync)
            grad_logits.scatter_add_(1, t.where(trained, 0)[:, None], -trained.to(grad_logits.dtype)[:, None])
            grad_logits *= (grad_losses[start:start + ctx.chunk] * trained)[:, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:start + ctx.chunk])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h)
        return grad_hidden, grad_weight, None, None


class TokenLossHead(torch.nn.Linear):
    """The model's output layer (lm_head), which can also return per-token losses.

    `head(hidden)` gives logits as before (generation, export); `head(hidden, targets)` gives the
    cross-entropy of every position against its target (0 where IGNORE_INDEX), computed inside this
    module's forward so that under ZeRO-3 DeepSpeed's hooks have gathered the weight (a partitioned
    shard outside it) and gather it again for the backward pass. `loss_chunk_tokens` tokens go
    through the layer at a time, so the [tokens, vocab] logits (and their fp32 copies) are never
    materialised in full; None computes them whole, as transformers' own forward does.
    """

    loss_chunk_tokens: int | None = None

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(hidden)
        hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        if self.loss_chunk_tokens is None:
            logits = super().forward(hidden)
            losses = torch.nn.functional.cross_entropy(logits.float(), flat_targets, ignore_index=IGNORE_INDEX,
                                                       reduction="none")
        else:
            losses = _ChunkedTokenLosses.apply(hidden, self.weight, flat_targets, self.loss_chunk_tokens)
        return losses.view(targets.shape)


def enable_token_losses(model, loss_chunk_tokens: int | None) -> None:
    """Let `model(input_ids=, position_ids=, targets=)` return per-token losses (see token_losses).

    The output layer becomes a TokenLossHead (same parameter, same state-dict key), and the
    model's forward gains `targets`: given them, it runs the decoder and the head's loss in place
    of the logits; without them it is the model's own forward. Both live inside the model's
    forward so a DeepSpeed engine wrapping the model calls them with its hooks in place.
    """
    if loss_chunk_tokens is not None and loss_chunk_tokens < 1:
        raise ValueError(f"model.loss_chunk_tokens={loss_chunk_tokens}: expected a positive token count or null")
    head = model.get_output_embeddings()
    head.__class__ = TokenLossHead  # an nn.Linear subclass: the weight, its key and ZeRO-3 state stay as they are
    head.loss_chunk_tokens = loss_chunk_tokens
    model_forward = type(model).forward

    @functools.wraps(model_forward)
    def forward(*args, targets=None, **kwargs):
        if targets is None:
            return model_forward(model, *args, **kwargs)
        return _token_losses_forward(model, targets=targets, **kwargs)

    model.forward = forward


def _token_losses_forward(model, input_ids, position_ids, targets) -> torch.Tensor:
    shape = targets.shape
    if is_flash_attention_requested(model.config):
        # transformers runs flash-attention's variable-length kernel (one causal block per
        # example, from position ids that restart) only for a batch of one row; a batch of
        # several packed rows would get one causal block per row, letting each example attend to
        # the ones packed before it. One row of all the micro batch's rows keeps examples apart.
        input_ids, position_ids, targets = (t.reshape(1, -1) for t in (input_ids, position_ids, targets))
    hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden, targets).view(shape)


def token_losses(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of every position against its (already shifted) target; 0 where none.

    `model` is one prepared by load_model (enable_token_losses), bare or inside a DeepSpeed engine.
    No attention mask is passed, on purpose: with restarting position_ids and no mask (and no
    cache) transformers builds the block-diagonal causal mask of packed rows (sdpa, eager), or
    runs flash-attention's variable-length kernel on the rows flattened into one; right padding
    needs no mask under causal attention.
    """
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], targets=batch["targets"])


def generation_config(model, tokenizer, generation_cfg) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=generation_cfg.do_sample,
        temperature=generation_cfg.temperature, top_p=generation_cfg.top_p)


EXPORT_SHARD_SIZE = "5GB"  # an 8B exports as 4 safetensors shards + index (not one 16 GB file)


def save_model(model, state_dict: dict, tokenizer, generation_cfg, directory: Path) -> int:
    """Write complete HF safetensors (in shards of EXPORT_SHARD_SIZE), tokenizer (chat template)
    and configs into `directory`, loadable by transformers 4.x and 5.x alike (the tokenizer by
    data_prep.chat_format.save_tokenizer, config.json by add_transformers4_rope_keys).

    `state_dict` is the full one (accelerator.get_state_dict gathers it from ZeRO-3 partitions);
    the count of parameters written is checked against the model's own, so a partitioned stub can
    never pass for a model. Returns that count.
    """
    model.config.use_cache = True
    model.generation_config = generation_config(model, tokenizer, generation_cfg)
    model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True, max_shard_size=EXPORT_SHARD_SIZE)
    add_transformers4_rope_keys(directory / "config.json")
    save_tokenizer(tokenizer, directory)
    expected = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    written = count_saved_parameters(directory)
    if written != expected:
        raise RuntimeError(f"exported {written} parameters to {directory}, the model has {expected}: incomplete export")
    return written


def add_transformers4_rope_keys(config_file: Path) -> None:
    """Add to a config.json written by transformers 5 the RoPE keys transformers 4 reads.

    transformers 5 writes RoPE's settings only as `rope_parameters` (`rope_theta` inside it), a key
    4.x does not read: 4.x would build Llama-3's rotary embedding with its default base 10,000
    instead of 500,000, and the model would load without a warning and compute something else.
    4.x reads `rope_theta`, and `rope_scaling` (null for plain RoPE; else the scaling settings,
    such as Llama 3.1's `llama3` type). 5.x reads both back to the same `rope_parameters`.
    Per-layer-type RoPE (a nested `rope_parameters`, e.g. Gemma 3) has no 4.x form here: it is
    left as 5.x wrote it, with a warning.
    """
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters")
    if not rope:
        return
    if "rope_theta" not in rope:
        log.warning("%s: rope_parameters %s are per layer type; transformers 4.x may not read them", config_file, rope)
        return
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    config["rope_theta"] = rope["rope_theta"]
    config["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    artifacts.write_json(config_file, config)


def count_saved_parameters(directory: Path) -> int:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise RuntimeError(f"no safetensors written in {directory}")
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def model_card(base_model: str, end_of_turn: str, config_yaml: str, manifest: dict, metrics: dict) -> str:
    """README.md of the exported model: what it is, how to run it, what it was trained with/on."""
    return f"""---
library_name: transformers
base_model: {base_model}
tags: [user-simulator, userlm]
---
# User language model fine-tuned from {base_model}

A *user* language model: it plays the human side of a chat with an assistant, conditioned on a
one-sentence task intent in the system prompt (the recipe of UserLM-8b, "Flipping the Dialogue",
arXiv 2510.06552), trained with userlm-pipeline's `train/run.py`. It writes the next user turn;
`{END_CONVERSATION}` means the user ends the conversation.

## Use (UserLM-8b's published snippet: it runs alike under transformers 4.x and 5.x; `return_dict=False` is needed since 5)
```python
from transformers import AutoTokenizer, AutoModelForCausalLM

model_path = "PATH/TO/THIS/DIRECTORY"
tokenizer = AutoTokenizer.from_pretrained(model_path)
model = AutoModelForCausalLM.from_pretrained(model_path)
messages = [{{"role": "system", "content": "You are a user chatting with an assistant language model to ..."}}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=False)
end_token_id = tokenizer.encode("{end_of_turn}", add_special_tokens=False)
end_conv_token_id = tokenizer.encode("{END_CONVERSATION}", add_special_tokens=False)
outputs = model.generate(input_ids=inputs, do_sample=True, top_p=0.8, temperature=1, max_new_tokens=10,
                         eos_token_id=end_token_id, pad_token_id=tokenizer.eos_token_id,
                         bad_words_ids=[[token_id] for token_id in end_conv_token_id])
print(tokenizer.decode(outputs[0][inputs.shape[1]:], skip_special_tokens=True))
```

## Final metrics
```json
{json.dumps(metrics, indent=2, sort_keys=True)}
```

## Training configuration (resolved)
```yaml
{config_yaml.rstrip()}
```

## Training data (data_prep manifest)
```json
{json.dumps(manifest, indent=2, sort_keys=True)}
```
"""
