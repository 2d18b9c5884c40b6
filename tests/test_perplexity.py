"""python -m evaluate.perplexity on the tiny models: exact per-token perplexity, modes, end-token rule."""

import json
import math
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import evaluate.config  # noqa: F401  (registers the schemas before composing)
from data_prep.chat_format import END_CONVERSATION, USER, ChatEncoder, format_of
from evaluate.perplexity import result_name, run
from tests.conftest import REPO, compose_config, preset_changes


def perplexity_config(tmp_path, model, tiny_data, tiny_prism, *extra):
    return compose_config("perplexity", [
        "experiment=tiny", f"model={model}", f"data_dirs.wildchat={tiny_data}", f"data_dirs.prism={tiny_prism}",
        f"output_dir={tmp_path / 'results'}", "max_seq_len=4096", *extra])


def score(tmp_path, model, tiny_data, tiny_prism, *extra) -> dict:
    return json.loads(run(perplexity_config(tmp_path, model, tiny_data, tiny_prism, *extra)).read_text())


def hand_computed_nll(model_dir, data_dir, intent: str, limit: int) -> tuple[float, int]:
    """Sum of target-token NLLs the plain way: each user turn's tokens are what apply_chat_template
    adds between the prompt before it and the prompt after it; each conversation prefix is scored by
    its own forward pass and a hand-written log-softmax lookup."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    chat_format = format_of(tokenizer)
    header = tokenizer(chat_format.header_start + USER + chat_format.header_end, add_special_tokens=False)["input_ids"]
    # What the template writes after a message: the separator (chatml's "\n", userlm's nothing), the user header.
    after = tokenizer(chat_format.separator + chat_format.header_start + USER + chat_format.header_end,
                      add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for row in datasets.load_from_disk(str(data_dir / "conversations" / "test")).select(range(limit)):
        messages = ([{"role": "system", "content": row["intent"]}] if intent == "task" else []) + row["turns"]
        messages += [{"role": USER, "content": END_CONVERSATION}] if row["ended"] else []
        for i, message in enumerate(messages):
            if message["role"] != USER:
                continue
            prompt = tokenizer.apply_chat_template(messages[:i], return_dict=False) if i else header
            full = tokenizer.apply_chat_template(messages[:i + 1], return_dict=False)[:-len(after)]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), dim=-1)
            for t in range(len(prompt), len(full)):
                total -= log_probs[t - 1, full[t]].item()
                count += 1
    return total, count


@pytest.mark.parametrize("intent", ["task", "none"])
def test_ppl_equals_a_hand_computation(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, intent):
    result = score(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, f"intent={intent}", "limit=6")
    total, count = hand_computed_nll(tiny_userlm_model, tiny_data, intent, limit=6)
    assert_matches(result, total, count)


@pytest.mark.parametrize("intent", ["task", "none"])
def test_a_chatml_user_lm_is_scored_in_its_own_format(tmp_path, tiny_chatml_user_model, tiny_chatml_data, intent):
    """A Qwen-family base prepared by data_prep with chat_format=chatml: perplexity reads the format
    from the tokenizer, and scores exactly the user turns as its template renders them."""
    result = score(tmp_path, tiny_chatml_user_model, tiny_chatml_data, tiny_chatml_data, f"intent={intent}", "limit=6")
    total, count = hand_computed_nll(tiny_chatml_user_model, tiny_chatml_data, intent, limit=6)
    assert_matches(result, total, count)


def assert_matches(result: dict, total: float, count: int) -> None:
    assert result["target_tokens"] == count
    assert result["nll_sum"] == pytest.approx(total, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    low, high = result["ppl_ci"]
    assert low < result["ppl"] < high


@pytest.mark.parametrize("protocol", ["userlm", "flipped_chat"])
def test_per_turn_and_per_conversation_agree(tmp_path, tiny_userlm_model, tiny_chatml_model, tiny_data, tiny_prism,
                                             protocol):
    model = tiny_userlm_model if protocol == "userlm" else tiny_chatml_model
    results = {mode: score(tmp_path, model, tiny_data, tiny_prism, f"mode={mode}", "dataset=prism",
                           f"protocol={protocol}", f"name={mode}", "max_tokens_per_batch=3000")
               for mode in ("per_turn", "per_conversation")}
    per_turn, per_conversation = results["per_turn"], results["per_conversation"]
    assert per_turn["counts"]["truncated_examples"] == per_conversation["counts"]["truncated_examples"] == 0
    assert per_turn["target_tokens"] == per_conversation["target_tokens"] > 0
    assert per_conversation["nll_sum"] == pytest.approx(per_turn["nll_sum"], rel=1e-4)
    for part in ("first_turn", "follow_up_turns", "end_of_conversation"):
        assert per_conversation["breakdown"][part]["target_tokens"] == per_turn["breakdown"][part]["target_tokens"]
        assert per_conversation["breakdown"][part]["nll_sum"] == pytest.approx(
            per_turn["breakdown"][part]["nll_sum"], rel=1e-4)
    assert per_conversation["counts"]["forward_tokens"] < per_turn["counts"]["forward_tokens"]


def test_end_token_rule_for_a_model_without_it(tmp_path, tiny_assets, tiny_userlm_model, tiny_data, tiny_prism):
    # The untrained tiny model has no row for <|endconversation|>, like Llama-3 base, even when given
    # the data directory's prepared tokenizer (which has the token).
    ended = sum(datasets.load_from_disk(str(tiny_data / "conversations" / "test"))["ended"])
    untrained = {rule: score(tmp_path, tiny_assets / "model", tiny_data, tiny_prism, f"name={rule}",
                             f"tokenizer={tiny_data / 'tokenizer'}", f"missing_end_token={rule}")
                 for rule in ("plain_text", "exclude")}
    trained = score(tmp_path, tiny_userlm_model, tiny_data, tiny_prism)
    raw = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    pieces = len(raw("\n" + END_CONVERSATION, add_special_tokens=False)["input_ids"]) + 1  # + <|eot_id|>
    one_token = len(ChatEncoder(AutoTokenizer.from_pretrained(tiny_userlm_model)).encode_bodies([END_CONVERSATION])[0])
    expected = {"plain_text": (False, ended * pieces), "exclude": (False, 0)}
    for rule, (in_vocabulary, end_tokens) in expected.items():
        assert untrained[rule]["end_token"]["in_vocabulary"] is in_vocabulary
        assert untrained[rule]["end_token"]["handling"] == rule
        assert untrained[rule]["breakdown"]["end_of_conversation"]["target_tokens"] == end_tokens
    assert trained["end_token"]["handling"] == "token"
    assert trained["breakdown"]["end_of_conversation"]["target_tokens"] == ended * one_token == ended * 3
    # The end target comes last, so it changes no other token's NLL: the two rules agree on the rest.
    plain, excluded = (untrained[r]["breakdown"]["without_end_of_conversation"] for r in ("plain_text", "exclude"))
    assert plain["target_tokens"] == excluded["target_tokens"] == untrained["exclude"]["target_tokens"]
    assert plain["nll_sum"] == pytest.approx(excluded["nll_sum"], rel=1e-9)


def test_intents_score_the_same_tokens(tmp_path, tiny_userlm_model, tiny_data, tiny_prism):
    results = {intent: score(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, f"intent={intent}")
               for intent in ("none", "task", "generic")}
    assert len({r["target_tokens"] for r in results.values()}) == 1
    assert len({r["nll_sum"] for r in results.values()}) == 3  # the system message is context


def test_result_file_is_reproducible_and_guarded(tmp_path, tiny_userlm_model, tiny_data, tiny_prism):
    path = run(perplexity_config(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, "name=m"))
    assert path == tmp_path / "results" / "m" / "wildchat-task.json"
    first = path.read_bytes()
    result = json.loads(first)
    assert result["data"]["fingerprint"] and result["packages"]["torch"] and result["config"]["model"]
    assert set(result["breakdown"]["by_turn"]) == {"1", "2", "3", "4"}
    assert sum(b["target_tokens"] for b in result["breakdown"]["by_turn"].values()) + \
        result["breakdown"]["end_of_conversation"]["target_tokens"] == result["target_tokens"]
    run(perplexity_config(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, "name=m", "overwrite=true"))
    assert path.read_bytes() == first  # same config, same bytes
    with pytest.raises(FileExistsError, match="another config"):
        run(perplexity_config(tmp_path, tiny_userlm_model, tiny_data, tiny_prism, "name=m", "limit=3"))
    assert result_name("microsoft/UserLM-8b", "userlm") == "microsoft--UserLM-8b"
    assert result_name("./outputs/tiny/train/final", "flipped_chat") == "outputs--tiny--train--final--flipped_chat"


def test_presets_compose():
    """Each preset by the values it changes (and nothing else)."""
    assert preset_changes("perplexity", "tiny", ["model=m"]) == {
        "data_dirs.wildchat": "outputs/tiny/data/wildchat", "data_dirs.prism": "outputs/tiny/data/prism",
        "max_seq_len": 512, "max_tokens_per_batch": 8192, "bootstrap.samples": 200,
        "output_dir": "outputs/tiny/results/perplexity"}
    assert preset_changes("perplexity", "paper", ["model=m"]) == {
        "data_dirs.wildchat": "outputs/paper/data/wildchat", "data_dirs.prism": "outputs/paper/data/prism"}
    for preset in ("tiny", "paper"):
        assert compose_config("table", [f"experiment={preset}"]).tables == ["perplexity", "intrinsic", "extrinsic",
                                                                            "funnel"]
    with pytest.raises(Exception, match="no_such_key"):
        compose_config("perplexity", ["model=m", "no_such_key=1"])


@pytest.mark.slow
def test_command_line(tmp_path, tiny_userlm_model, tiny_data, tiny_prism):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    overrides = ["experiment=tiny", f"model={tiny_userlm_model}", f"data_dirs.prism={tiny_prism}", "dataset=prism",
                 "intent=none", "name=cli"]
    subprocess.run([sys.executable, "-m", "evaluate.perplexity", *overrides, f"output_dir={tmp_path / 'cli'}"],
                   check=True, cwd=tmp_path, env=env, timeout=300)
    cli = json.loads((tmp_path / "cli" / "cli" / "prism-none.json").read_text())
    in_process = json.loads(run(compose_config("perplexity", [*overrides, f"output_dir={tmp_path / 'in_process'}"]))
                            .read_text())
    assert (cli["ppl"], cli["nll_sum"], cli["target_tokens"]) == (in_process["ppl"], in_process["nll_sum"],
                                                                  in_process["target_tokens"])
    assert cli["target_tokens"] > 0 and cli["ppl"] == pytest.approx(math.exp(cli["nll_sum"] / cli["target_tokens"]))


def test_a_stopped_run_resumes_from_its_saved_chunks(tmp_path, tiny_userlm_model, tiny_data, tiny_prism):
    # A copy of the data whose 8th conversation has no intent: intent=task stops in the second chunk.
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("train", "validation"))
    good = datasets.load_from_disk(str(tiny_data / "conversations" / "test"))
    broken = good.map(lambda row, i: {"intent": "" if i == 7 else row["intent"]}, with_indices=True)
    shutil.rmtree(data / "conversations" / "test")
    broken.save_to_disk(str(data / "conversations" / "test"))
    overrides = ("chunk_conversations=5", "name=resumed")
    with pytest.raises(ValueError, match="conversation 7 .* has no intent"):
        run(perplexity_config(tmp_path, tiny_userlm_model, data, tiny_prism, *overrides))
    [partial] = (tmp_path / "results" / "resumed").glob(".wildchat-task.partial-*")
    [saved] = partial.glob("*.npz")
    # Mark the saved chunk, so that the result shows it was reused, not recomputed.
    arrays = dict(np.load(saved))
    arrays["nll"][0] += 1.0
    np.savez(saved, **arrays)
    shutil.rmtree(data / "conversations" / "test")
    good.save_to_disk(str(data / "conversations" / "test"))
    resumed = json.loads(run(perplexity_config(tmp_path, tiny_userlm_model, data, tiny_prism, *overrides)).read_text())
    fresh = score(tmp_path, tiny_userlm_model, data, tiny_prism, "chunk_conversations=5", "name=fresh")
    assert resumed["nll_sum"] == pytest.approx(fresh["nll_sum"] + 1.0, rel=1e-12)
    assert resumed["counts"] == fresh["counts"] and not partial.exists()


def test_a_retrained_model_is_never_reported_with_old_numbers(tmp_path, tiny_userlm_model, tiny_data, tiny_prism):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_userlm_model, model_dir)
    run(perplexity_config(tmp_path, model_dir, tiny_data, tiny_prism, "name=m", "limit=3"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # "retrained": same config, other weights
    model.save_pretrained(model_dir)
    with pytest.raises(FileExistsError, match="another config, model or data"):
        run(perplexity_config(tmp_path, model_dir, tiny_data, tiny_prism, "name=m", "limit=3"))
