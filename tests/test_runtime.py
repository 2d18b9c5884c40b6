"""core.runtime: one device/dtype vocabulary, one stop-token rule, one generation pad policy, and an
instruct model whose pad is its EOS (as Qwen-Instruct ships) as a flipped_chat user."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import runtime
from data_prep.chat_format import END_OF_TEXT, EOT
from evaluate.transcripts import read_transcripts
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def chatml_pad_is_eos(tiny_chatml_model, tmp_path_factory):
    """The tiny ChatML "instruct model" with pad = EOS = <|im_end|>."""
    out = tmp_path_factory.mktemp("chatml_pad_is_eos")
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    tokenizer.pad_token = "<|im_end|>"
    tokenizer.save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(tiny_chatml_model).save_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).pad_token_id == AutoTokenizer.from_pretrained(out).eos_token_id
    return out


def test_an_instruct_model_whose_pad_is_its_eos_plays_the_user_in_simulate(chatml_pad_is_eos, tiny_data, tmp_path):
    import evaluate.simulate_config  # noqa: F401
    from evaluate.simulate import run
    out = run(compose_config("simulate", [
        "experiment=tiny", f"user_model.name_or_path={chatml_pad_is_eos}", "user_model.protocol=flipped_chat",
        "assistant.kind=scripted", f"intents.path={tiny_data}", "intents.limit=3", f"output_dir={tmp_path / 'sim'}",
        "progress=false", "sampling.max_new_tokens=8", "guardrails.max_retries=0", "conversation.max_user_turns=2"]))
    records = read_transcripts(out / "transcripts.jsonl")
    assert len(records) == 3
    user_turns = [t for r in records for t in r["turns"] if t["role"] == "user"]
    assert user_turns and all(0 < t["tokens"] <= 8 and "<|im_end|>" not in t["content"] for t in user_turns)
    assert json.loads((out / "summary.json").read_text())["conversations"] == 3


def test_an_instruct_model_whose_pad_is_its_eos_is_scored_in_perplexity(chatml_pad_is_eos, tiny_chatml_model,
                                                                         tiny_data, tiny_prism, tmp_path):
    import evaluate.config  # noqa: F401
    from evaluate.perplexity import run

    def score(model, name):
        return json.loads(run(compose_config("perplexity", [
            "experiment=tiny", f"model={model}", f"data_dirs.wildchat={tiny_data}", f"data_dirs.prism={tiny_prism}",
            f"output_dir={tmp_path}", "dataset=prism", "protocol=flipped_chat", f"name={name}"])).read_text())
    pad_is_eos, own_pad = score(chatml_pad_is_eos, "pad_is_eos"), score(tiny_chatml_model, "own_pad")
    assert pad_is_eos["target_tokens"] == own_pad["target_tokens"] > 0
    assert pad_is_eos["nll_sum"] == pytest.approx(own_pad["nll_sum"], rel=1e-6)   # the pad never reaches a score


# ---- the stop set and the pad --------------------------------------------------------------------
def test_stop_tokens_are_the_eos_the_generation_config_eos_and_present_extras(tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chatml_model)
    vocabulary = tokenizer.get_vocab()
    model.generation_config.eos_token_id = [vocabulary[END_OF_TEXT], None]
    assert runtime.stop_token_ids(tokenizer, model) == sorted({vocabulary["<|im_end|>"], vocabulary[END_OF_TEXT]})
    with_extras = runtime.stop_token_ids(tokenizer, model, (EOT, "<|not_in_this_vocabulary|>"))
    assert with_extras == sorted({vocabulary["<|im_end|>"], vocabulary[END_OF_TEXT], vocabulary[EOT]})
    with pytest.raises(ValueError, match=r"assistant.hf.stop_tokens: \['<\|nope\|>'\] not in"):
        runtime.token_ids(tokenizer, ["<|im_end|>", "<|nope|>"], "assistant.hf.stop_tokens")


def test_the_generation_pad_is_never_a_stop_token(tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    vocabulary = tokenizer.get_vocab()
    reserved = vocabulary["<|reserved_special_token_0|>"]
    tokenizer.pad_token = "<|reserved_special_token_1|>"                 # a pad that is no stop is kept
    assert runtime.generation_pad_id(tokenizer, [vocabulary["<|im_end|>"]], "<|reserved_special_token_0|>") \
        == vocabulary["<|reserved_special_token_1|>"]
    tokenizer.pad_token = "<|im_end|>"                                   # pad = EOS: the configured pad
    stops = [vocabulary["<|im_end|>"], 0]
    assert runtime.generation_pad_id(tokenizer, stops, "<|reserved_special_token_0|>") == reserved
    # Neither usable (Qwen has no Llama reserved token): the lowest id that is no stop.
    assert runtime.generation_pad_id(tokenizer, stops, "<|not_in_this_vocabulary|>") == 1
    assert runtime.generation_pad_id(tokenizer, stops + [reserved], "<|reserved_special_token_0|>") == 1


def test_batched_generation_cuts_at_the_first_stop_and_never_emits_the_pad(tiny_chatml_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chatml_model)
    model = runtime.load_causal_lm(tiny_chatml_model, "float32", "cpu")
    prompts = [tokenizer("hello there", add_special_tokens=False)["input_ids"],
               tokenizer("a much longer prompt than the first one", add_special_tokens=False)["input_ids"]]
    greedy = {"do_sample": False, "max_new_tokens": 12}
    free = runtime.generate_batch(model, 0, prompts, [len(tokenizer) + 1], greedy)   # a stop it never emits
    assert all(len(ids) == 12 and not stopped for ids, stopped in free)
    # Make the 4th generated token of the first prompt a stop: the row is cut at its first occurrence.
    stop = free[0][0][3]
    outputs = runtime.generate_batch(model, 0 if stop != 0 else 1, prompts, [stop], greedy)
    assert outputs[0] == (free[0][0][:free[0][0].index(stop)], True)
    for ids, stopped in outputs:
        assert stop not in ids and (stopped or len(ids) == 12)
    with pytest.raises(ValueError, match="not a stop"):
        runtime.generate_batch(model, stop, prompts, [stop], greedy)


# ---- device, dtype, padded batches ---------------------------------------------------------------
def test_one_dtype_vocabulary_and_train_precision_maps_onto_it():
    from train.model import resolve_precision
    cpu = torch.device("cpu")
    assert runtime.resolve_dtype("auto", cpu) == torch.float32 and runtime.resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype='bf16': expected auto or one of bfloat16, float16, float32"):
        runtime.resolve_dtype("bf16", cpu)
    assert runtime.resolve_device("cpu") == cpu
    assert resolve_precision("bf16") == torch.bfloat16 and resolve_precision("fp32") == torch.float32
    assert resolve_precision("auto") == runtime.resolve_dtype("auto", runtime.resolve_device("auto"))


def test_padded_batches_are_length_bucketed_and_right_padded():
    assert runtime.length_batches([3, 5, 1, 5], max_tokens_per_batch=10, max_batch_size=8) == [[1, 3], [0, 2]]
    ids, mask = runtime.right_padded([[7, 8], [9]], value=-100)
    assert ids.tolist() == [[7, 8], [9, -100]] and mask.tolist() == [[1, 1], [1, 0]]
