"""Build the tiny tokenizer and model that the quickstart, tests and benchmarks use (offline).

    python scripts/make_tiny_assets.py --out outputs/tiny       # -> outputs/tiny/{tokenizer,model}
    python scripts/make_tiny_assets.py --family qwen --out outputs/tiny-qwen   # a ChatML-family base

The tokenizer is a byte-level BPE trained on the embedded sample's text with a family's
pre-tokenizer and special tokens at the end of its vocabulary. llama3 (the default): Llama-3's
(<|begin_of_text|>, <|end_of_text|>, reserved tokens, <|start_header_id|>, <|end_header_id|>,
<|eot_id|>); like Meta-Llama-3-8B it has no <|endconversation|> and no pad token: the pipeline adds
them (data_prep.chat_format.prepare_tokenizer), exactly as it does for the paper's base model.
qwen: Qwen2.5's (NFC, its split pattern, <|endoftext|> as EOS, <|im_start|>, <|im_end|>, no BOS),
the base of `chat_format=chatml`. The model is a randomly initialised Llama of a few hundred
thousand parameters, saved with save_pretrained. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from data_prep.chat_format import (BEGIN_OF_TEXT, END_HEADER, END_OF_TEXT, EOT, IM_END, IM_END_OF_TEXT, IM_START,
                                   START_HEADER)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data_prep" / "sample"
# Llama-3's pre-tokenizer split pattern (tokenizer.json of Meta-Llama-3-8B).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# In Llama-3's order (ids 128000-128009 there).
SPECIAL_TOKENS = [BEGIN_OF_TEXT, END_OF_TEXT, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                  "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", START_HEADER, END_HEADER,
                  "<|reserved_special_token_4|>", EOT]
# Qwen2.5's split pattern (its tokenizer.json: digits one at a time) and first special tokens, in its order.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIAL_TOKENS = [IM_END_OF_TEXT, IM_START, IM_END]
FAMILIES = ("llama3", "qwen")


def sample_texts(sample_dir: Path):
    table = pq.read_table(sample_dir / "wildchat.parquet", columns=["conversation"])
    for conversation in table.column("conversation").to_pylist():
        for turn in conversation:
            yield turn["content"]
    with open(sample_dir / "prism.jsonl") as f:
        for line in f:
            for entry in json.loads(line)["conversation_history"]:
                yield entry["content"]
    with open(sample_dir / "intents.jsonl") as f:
        for line in f:
            yield json.loads(line)["intent"]


def build_tokenizer(texts, vocab_size: int, family: str = "llama3") -> PreTrainedTokenizerFast:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {', '.join(FAMILIES)}")
    tokenizer = Tokenizer(models.BPE())
    if family == "qwen":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT if family == "llama3" else QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if family == "qwen":
        tokenizer.add_special_tokens(QWEN_SPECIAL_TOKENS)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END_OF_TEXT, pad_token=IM_END_OF_TEXT,
                                       model_max_length=8192)
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT}:0 $A:0", pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
        special_tokens=[(BEGIN_OF_TEXT, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT,
                                   model_max_length=8192)


def build_model(tokenizer, hidden: int, layers: int, seed: int, vocab_size: int | None = None) -> LlamaForCausalLM:
    """A random Llama over `tokenizer` (`vocab_size` embedding rows; default: the tokenizer's size)."""
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_tiny_assets(out: Path, sample_dir: Path = SAMPLE_DIR, vocab_size: int = 2048, hidden: int = 64,
                      layers: int = 2, seed: int = 0, family: str = "llama3") -> LlamaForCausalLM:
    """out/tokenizer, and out/model (the model with its tokenizer); returns the model."""
    tokenizer = build_tokenizer(sample_texts(sample_dir), vocab_size, family)
    tokenizer.save_pretrained(out / "tokenizer")
    model = build_model(tokenizer, hidden, layers, seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny"))
    parser.add_argument("--sample-dir", type=Path, default=SAMPLE_DIR)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--family", choices=FAMILIES, default="llama3", help="llama3, or qwen (for chat_format=chatml)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = write_tiny_assets(args.out, args.sample_dir, args.vocab_size, args.hidden, args.layers, args.seed,
                              args.family)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {model.config.vocab_size} tokens; model: {n_params:,} parameters -> {args.out}")


if __name__ == "__main__":
    main()
