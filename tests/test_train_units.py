"""train/: config, packing, batch plan, collation, model loading: in-process, on the tiny assets."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from hydra.errors import ConfigCompositionException

import train.config  # noqa: F401  (registers the train schema)
from data_prep.chat_format import END_CONVERSATION, EOT, IGNORE_INDEX
from tests.conftest import REPO, compose_config
from train.data import Plan, batch_arithmetic, collate, evaluation_batches, load_split, make_rows, pack
from train.model import (add_transformers4_rope_keys, check_tokenizer_matches_model, load_model, load_tokenizer,
                         save_model, token_losses)
from train.optim import deepspeed_config, warmup_cosine


def model_cfg(tiny_assets):
    return OmegaConf.create({"name_or_path": str(tiny_assets / "model"), "revision": None, "trust_remote_code": False,
                             "loss_chunk_tokens": 100})


@pytest.mark.parametrize("experiment", ["tiny", "paper"])
def test_presets_compose(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.deepspeed == "conf/deepspeed/zero3.json" and (REPO / cfg.deepspeed).exists()
    assert cfg.optimizer.lr == (3e-3 if experiment == "tiny" else 2e-5)


def test_boolean_choices_survive_yaml():
    from train.model import resolve_gradient_checkpointing
    for value, resolved in (("true", True), ("false", False), ("null", torch.cuda.is_available())):
        cfg = compose_config("train", [f"model.gradient_checkpointing={value}"])
        assert resolve_gradient_checkpointing(cfg.model.gradient_checkpointing) is resolved


def test_unknown_key_fails():
    with pytest.raises(ConfigCompositionException):
        compose_config("train", ["train.learning_rate=1e-4"])


def test_batch_arithmetic_is_exact_or_refused():
    a = batch_arithmetic(1024, 4, 8, round_global_batch=False)
    assert (a.accumulation, a.global_batch_size) == (32, 1024)
    assert "1024 rows = 8 processes x 4 rows per micro batch x 32 accumulation steps" in str(a)
    with pytest.raises(ValueError, match="round_global_batch=true to use 1020"):
        batch_arithmetic(1024, 4, 3, round_global_batch=False)
    assert batch_arithmetic(1024, 4, 3, round_global_batch=True).global_batch_size == 1020


def test_pack_places_every_example_once_within_capacity():
    lengths = np.random.default_rng(0).integers(20, 900, size=3000)
    rows = pack(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(3000))
    loads = [lengths[row].sum() for row in rows]
    assert max(loads) <= 1024
    assert lengths.sum() / (1024 * len(rows)) > 0.97  # best-fit decreasing wastes little
    assert rows == pack(lengths, 1024)  # deterministic


def test_plan_splits_each_global_batch_the_same_whatever_the_micro_batch(tiny_data):
    split = load_split(tiny_data, "train", None, 512)
    rows = make_rows(split.lengths, 512, packing=True)
    plans = [Plan(split, rows, batch_arithmetic(16, micro, 2, False), seed=0, max_seq_len=512) for micro in (1, 4, 8)]
    for step in range(plans[0].steps_per_epoch + 2):  # into the second epoch
        dealt = [sorted(r for rank in range(2) for micro in p.micro_batches(step, rank) for r in micro) for p in plans]
        assert dealt[0] == dealt[1] == dealt[2] == sorted(plans[0].step_rows(step))
    first_epoch = np.concatenate([plans[0].step_rows(s) for s in range(plans[0].steps_per_epoch)])
    assert len(set(first_epoch)) == len(first_epoch)  # no row twice in an epoch
    assert not np.array_equal(plans[0].step_rows(0), plans[0].step_rows(plans[0].steps_per_epoch))  # reshuffled
    stats = plans[0].epoch_statistics()
    assert stats["examples"] == len(split.lengths) and stats["packing_efficiency"] > 0.95


def test_collate_shifts_labels_inside_each_example(tiny_data):
    split = load_split(tiny_data, "train", None, 512)
    batch = collate(split, [[3, 4], [5]], pad_id=7, max_seq_len=512)
    ex3, ex4 = split.examples[3], split.examples[4]
    n3, n4 = len(ex3["input_ids"]), len(ex4["input_ids"])
    assert batch["input_ids"][0, :n3 + n4].tolist() == ex3["input_ids"] + ex4["input_ids"]
    assert batch["position_ids"][0, :n3 + n4].tolist() == list(range(n3)) + list(range(n4))
    assert batch["targets"][0, :n3].tolist() == ex3["labels"][1:] + [IGNORE_INDEX]  # never predicts ex4's start
    assert batch["targets"][0, n3:n3 + n4].tolist() == ex4["labels"][1:] + [IGNORE_INDEX]
    assert batch["input_ids"].shape[1] % 8 == 0 and (batch["input_ids"][1, split.lengths[5]:] == 7).all()
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == split.targets[[3, 4, 5]].sum()


def test_evaluation_batches_are_even_across_processes(tiny_data):
    split = load_split(tiny_data, "validation", None, 512)
    rows = make_rows(split.lengths, 512, packing=False)
    shares = [evaluation_batches(split, rows, 4, 3, rank) for rank in range(3)]
    assert len({len(s) for s in shares}) == 1
    assert sorted(i for s in shares for b in s for row in b for i in row) == list(range(len(split.lengths)))


def test_too_long_example_is_refused_by_name(tiny_data):
    with pytest.raises(ValueError, match=r"example \d+ \(conversation \w+\) has \d+ tokens > data.max_seq_len=64"):
        load_split(tiny_data, "train", None, 64)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_row_gives_each_example_its_own_losses(tiny_assets, tiny_data, attention):
    """transformers turns restarting position ids (no attention mask) into a block-diagonal mask."""
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(model_cfg(tiny_assets), tokenizer, torch.float32, attention).eval()
    split = load_split(tiny_data, "train", None, 512)
    row = [10, 11, 12]
    packed = collate(split, [row], tokenizer.pad_token_id, 512)
    with torch.no_grad():
        packed_losses = token_losses(model, packed)[0]
        at = 0
        for i in row:
            n = int(split.lengths[i])
            alone = token_losses(model, collate(split, [[i]], tokenizer.pad_token_id, 512))[0, :n]
            torch.testing.assert_close(packed_losses[at:at + n], alone, atol=1e-5, rtol=1e-5)
            at += n
        # The control: one running position count lets the later examples see the earlier ones.
        contiguous = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        assert not torch.allclose(token_losses(model, contiguous)[0, :at], packed_losses[:at], atol=1e-3)


def test_load_model_adds_mean_initialised_rows_and_userlm_eos(tiny_assets, tiny_data):
    tokenizer = load_tokenizer(tiny_data)
    base = load_model(model_cfg(tiny_assets), tokenizer, torch.float32, "sdpa")
    old = len(tokenizer) - 1  # the base vocabulary has no <|endconversation|>
    assert tokenizer.convert_tokens_to_ids(END_CONVERSATION) == old
    for weight in (base.get_input_embeddings().weight, base.get_output_embeddings().weight):
        assert weight.shape[0] == len(tokenizer)
        torch.testing.assert_close(weight[old], weight[:old].mean(0))
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert base.config.eos_token_id == base.generation_config.eos_token_id == eot
    assert base.config.pad_token_id == tokenizer.pad_token_id != eot


def test_a_new_token_on_a_padded_matrix_row_gets_the_mean_too(tiny_qwen_assets, tiny_chatml_data, tmp_path):
    """Qwen2.5 pads its embedding matrix past its tokenizer (151,936 rows, 151,665 tokens): the
    token data_prep adds lands on an untrained padding row, which must be set like a grown one."""
    from transformers import AutoTokenizer
    from scripts.make_tiny_assets import build_model
    base_tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_assets / "tokenizer")
    padded = len(base_tokenizer) + 16
    build_model(base_tokenizer, hidden=64, layers=2, seed=0, vocab_size=padded).save_pretrained(tmp_path / "model")
    base_tokenizer.save_pretrained(tmp_path / "model")
    tokenizer = load_tokenizer(tiny_chatml_data)   # the base's tokens, then <|endconversation|>
    first_new = check_tokenizer_matches_model(tokenizer, model_cfg(tmp_path))
    assert first_new == len(base_tokenizer) == tokenizer.convert_tokens_to_ids(END_CONVERSATION) == len(tokenizer) - 1
    untouched = build_model(base_tokenizer, hidden=64, layers=2, seed=0, vocab_size=padded)
    model = load_model(model_cfg(tmp_path), tokenizer, torch.float32, "sdpa", first_new)
    for weight, original in ((model.get_input_embeddings().weight, untouched.get_input_embeddings().weight),
                             (model.get_output_embeddings().weight, untouched.get_output_embeddings().weight)):
        assert weight.shape[0] == padded   # the padding rows past the tokenizer are kept
        torch.testing.assert_close(weight[first_new], original[:first_new].mean(0))
        torch.testing.assert_close(weight[first_new + 1:], original[first_new + 1:])
        torch.testing.assert_close(weight[:first_new], original[:first_new])
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tokenizer_that_disagrees_with_the_model_is_refused(tiny_assets, tiny_data, tmp_path):
    from scripts.make_tiny_assets import build_tokenizer, sample_texts
    shutil.copytree(tiny_assets / "model", tmp_path / "model")
    build_tokenizer(sample_texts(REPO / "data_prep" / "sample"), vocab_size=1000).save_pretrained(tmp_path / "model")
    tokenizer = load_tokenizer(tiny_data)
    check_tokenizer_matches_model(tokenizer, model_cfg(tiny_assets))  # the same tokenizer: fine
    with pytest.raises(ValueError, match="does not match model"):
        check_tokenizer_matches_model(tokenizer, model_cfg(tmp_path))


def test_export_config_carries_the_rope_keys_transformers4_reads(tiny_assets, tiny_data, tmp_path):
    """transformers 5 writes only rope_parameters; 4.x would silently run Llama-3 with rope_theta 10,000.
    (tests/test_checkpoint_compat.py runs the export under 4.57.6 itself.)"""
    from transformers import AutoConfig, LlamaConfig
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(model_cfg(tiny_assets), tokenizer, torch.float32, "sdpa")
    save_model(model, model.state_dict(), tokenizer, compose_config("train", ["experiment=tiny"]).generation, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["rope_theta"], config["rope_scaling"]) == (500000.0, None)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == {"rope_theta": 500000.0, "rope_type": "default"}
    # Llama 3.1's scaled RoPE: 4.x's rope_scaling is the same settings less rope_theta; 5.x reads them back.
    llama31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    LlamaConfig(rope_parameters=dict(llama31), max_position_embeddings=131072).save_pretrained(tmp_path / "scaled")
    add_transformers4_rope_keys(tmp_path / "scaled" / "config.json")
    config = json.loads((tmp_path / "scaled" / "config.json").read_text())
    assert config["rope_theta"] == 500000.0
    assert config["rope_scaling"] == {k: v for k, v in llama31.items() if k != "rope_theta"}
    assert AutoConfig.from_pretrained(tmp_path / "scaled").rope_parameters == llama31


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.0)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0) and factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5) and 0 < factor(99) < 0.01
    assert all(factor(s) >= factor(s + 1) for s in range(10, 99))
    assert math.isclose(warmup_cosine(10, 0.0, 0.1)(0), 1.0)


def test_deepspeed_json_autos_are_filled_from_our_config(tmp_path):
    arithmetic = batch_arithmetic(64, 2, 4, False)
    config = deepspeed_config(REPO / "conf/deepspeed/zero3.json", arithmetic, 1.0, bf16=False,
                              grad_accum_dtype="fp32")
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["gradient_clipping"]) == (64, 2, 8, 1.0)
    assert config["bf16"]["enabled"] is False and config["zero_optimization"]["stage"] == 3
    fixed = tmp_path / "fixed.json"
    fixed.write_text('{"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}}')
    with pytest.raises(ValueError, match='gradient_accumulation_steps=4 disagrees'):
        deepspeed_config(fixed, arithmetic, 1.0, bf16=False, grad_accum_dtype="fp32")


def test_training_fingerprint_follows_data_and_recipe_not_bookkeeping(tmp_path):
    """A finished or checkpointed run is reused only for the same data and training recipe."""
    from train.run import training_fingerprint
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "manifest.json").write_text('{"a": 1}')
    base = ["experiment=tiny", f"data.path={data_dir}"]
    reference = training_fingerprint(compose_config("train", base), data_dir)
    assert training_fingerprint(compose_config("train", base + ["train.eval_every=3", "train.resume=null"]),
                                data_dir) == reference
    assert training_fingerprint(compose_config("train", base + ["optimizer.lr=1e-4"]), data_dir) != reference
    assert training_fingerprint(compose_config("train", base + ["train.epochs=9"]), data_dir) != reference
    (data_dir / "manifest.json").write_text('{"a": 2}')  # data_prep rewrote the data
    assert training_fingerprint(compose_config("train", base), data_dir) != reference


def test_training_flops_by_hand():
    """One step's FLOPs for a model small enough to count by hand (what train/run.py logs as mfu)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from train.metrics import training_flops
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    # q, k, v, o (8 x 8 each), gate, up, down (8 x 16 each), three RMSNorms of 8, lm_head 32 x 8;
    # the embedding table (32 x 8) is a lookup, as train/run.py counts it.
    matmul_params = 4 * 8 * 8 + 3 * 8 * 16 + 3 * 8 + 32 * 8
    assert sum(p.numel() for p in model.parameters()) - 32 * 8 == matmul_params == 920
    # Two examples of 3 and 5 tokens: 6 x 920 x 8 for the weights; causal QK^T and AV, 2 x n^2 x 8
    # forward per layer and example (half of the square), x3 with the backward pass: 6 x 8 x (9 + 25).
    flops = training_flops(matmul_params, layers=1, hidden=8, tokens=3 + 5, squared_lengths=3 ** 2 + 5 ** 2)
    assert flops == 6 * 920 * 8 + 6 * 8 * (9 + 25) == 45792
