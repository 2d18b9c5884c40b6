"""`accelerate launch train/run.py` for real: 2 CPU processes, DeepSpeed ZeRO-3 over gloo, tiny model.

Four launches (each ~15 s of imports): a memorisation run with checkpoints and export, its resume
from a middle checkpoint, and one step under two splits of the same global batch, checked against
a plain single-process reference. The first DeepSpeed use on a machine compiles a communication op
(~60 s) into torch's extensions cache (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.chat_format import END_CONVERSATION, EOT
from tests.conftest import REPO, compose_config

pytestmark = pytest.mark.slow


def launch(output_dir: Path, overrides: list[str]) -> str:
    """Run train/run.py under `accelerate launch` with conf/accelerate/cpu.yaml; return its log."""
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    env.pop("ACCELERATE_USE_CPU", None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "conf/accelerate/cpu.yaml"), str(REPO / "train/run.py"), f"output_dir={output_dir}",
               *overrides]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = done.stdout + done.stderr
    (output_dir.parent / f"{output_dir.name}.log").write_text(log)
    assert done.returncode == 0, log[-5000:]
    return log


def assert_real_deepspeed(log: str, output_dir: Path) -> None:
    """Accelerate's CPU traps (conf/accelerate/cpu.yaml) run something else silently: check what
    actually ran."""
    assert "run: 2 processes, backend gloo, DeepSpeed engine ZeRO stage 3, float32" in log
    setup = json.loads((output_dir / "run_info.json").read_text())["setup"]
    assert (setup["processes"], setup["backend"], setup["deepspeed_zero_stage"]) == (2, "gloo", 3)


def steps(output_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def tiny_overrides(tiny_assets: Path, tiny_data: Path, *extra: str) -> list[str]:
    return ["experiment=tiny", f"data.path={tiny_data}", f"model.name_or_path={tiny_assets / 'model'}",
            "wandb.mode=disabled", *extra]


MEMORISE = ("data.max_train_examples=16", "data.packing=false", "train.global_batch_size=8",
            "train.micro_batch_size=2", "train.epochs=10", "optimizer.lr=1e-2", "train.eval_every=10",
            "train.save_every=5", "train.save_total_limit=2")
PINNED_LOSSES = (7.6263, 3.4799, 2.2833)   # MEMORISE's losses at steps 1, 10 and 20 (tiny model, seed 0)


@pytest.fixture(scope="module")
def memorise_run(tiny_assets, tiny_data, tmp_path_factory):
    """16 examples, 2 steps per epoch, 10 epochs; checkpoints at 5, 10, 15 (two kept); exported."""
    output_dir = tmp_path_factory.mktemp("train") / "memorise"
    log = launch(output_dir, tiny_overrides(tiny_assets, tiny_data, *MEMORISE, "wandb.mode=offline"))
    return output_dir, log


def test_zero3_run_memorises_checkpoints_and_exports(memorise_run, tiny_assets):
    output_dir, log = memorise_run
    assert_real_deepspeed(log, output_dir)
    assert "global batch 8 rows = 2 processes x 2 rows per micro batch x 2 accumulation steps" in log
    history = steps(output_dir)
    assert sorted(history) == list(range(1, 21))
    first, last = history[1]["loss"], (history[19]["loss"] + history[20]["loss"]) / 2
    assert last < 0.5 * first, (first, last)  # 16 examples are memorised
    # Pinned: a change of loss normalisation, data order, masking or optimiser moves these.
    assert (history[1]["loss"], history[10]["loss"], history[20]["loss"]) == pytest.approx(PINNED_LOSSES, abs=2e-3)
    # Two newest checkpoints kept; each holds every process's ZeRO-3 shards.
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_00000010", "step_00000015"]
    shards = sorted(p.name for p in (output_dir / "checkpoints/step_00000015/pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2 and "zero_pp_rank_1" in shards[1]
    assert list((output_dir / "wandb").glob("offline-run-*"))

    model_dir = output_dir / "model"
    weights = load_file(model_dir / "model.safetensors")
    base = load_file(tiny_assets / "model" / "model.safetensors")
    assert weights.keys() == base.keys()
    for name, tensor in weights.items():  # complete: no partitioned stub; one new vocabulary row
        assert tensor.shape[0] == base[name].shape[0] + ("embed" in name or "lm_head" in name), name
    card = (model_dir / "README.md").read_text()
    assert "global_batch_size: 8" in card and '"token_statistics"' in card and "val_perplexity" in card


def test_export_runs_in_userlm_8b_snippet(memorise_run):
    """UserLM-8b's published usage, as is (plus return_dict=False, needed since transformers 5)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = str(memorise_run[0] / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    messages = [{"role": "system", "content": "You are a user chatting with an assistant language model to "
                                              "obtain some recommendations of places to see in Algeria."}]
    inputs = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=False)
    end_token_id = tokenizer.encode(EOT, add_special_tokens=False)
    end_conv_token_id = tokenizer.encode(END_CONVERSATION, add_special_tokens=False)
    assert len(end_token_id) == len(end_conv_token_id) == 1
    assert model.generation_config.eos_token_id == end_token_id[0] == tokenizer.eos_token_id
    torch.manual_seed(0)
    outputs = model.generate(input_ids=inputs, do_sample=True, top_p=0.8, temperature=1, max_new_tokens=10,
                             eos_token_id=end_token_id, pad_token_id=tokenizer.eos_token_id,
                             bad_words_ids=[[token_id] for token_id in end_conv_token_id])
    new_tokens = outputs[0][inputs.shape[1]:]
    new_tokens = new_tokens.tolist()
    assert 0 < len(new_tokens) <= 10 and end_conv_token_id[0] not in new_tokens
    # It stops at <|eot_id|> only (or at max_new_tokens), and writes no other special token.
    ended = new_tokens[-1] == end_token_id[0]
    assert ended or len(new_tokens) == 10, new_tokens
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    assert text == tokenizer.decode(new_tokens[:-1] if ended else new_tokens), new_tokens


def test_resume_continues_exactly(memorise_run, tiny_assets, tiny_data, tmp_path):
    """Stopped after step 10 (its checkpoint), resumed: steps 11..20 as in the uninterrupted run."""
    full_dir, _ = memorise_run
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(full_dir, resumed_dir, ignore=shutil.ignore_patterns("step_00000015", "model", "wandb"))
    log = launch(resumed_dir, tiny_overrides(tiny_assets, tiny_data, *MEMORISE, "train.resume=auto"))
    assert_real_deepspeed(log, resumed_dir)
    assert "step_00000010 at step 10" in log
    full, resumed = steps(full_dir), steps(resumed_dir)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-6, abs=1e-7), step
        assert resumed[step]["lr"] == pytest.approx(full[step]["lr"], rel=1e-9), step
    a, b = load_file(full_dir / "model/model.safetensors"), load_file(resumed_dir / "model/model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


# AdamW's first step is lr * g / (|g| + eps): with the default eps it is nearly lr * sign(g), blind
# to the gradient's scale and sensitive to float noise where g ~ 0. eps 1e-3 (|g| is ~4e-3 here)
# makes the step follow the gradient's size too, and the comparison robust.
ONE_STEP = ("data.packing=false", "train.global_batch_size=8", "train.max_steps=1", "train.eval_every=0",
            "train.save_every=0", "optimizer.lr=1e-3", "optimizer.eps=1e-3", "optimizer.warmup_ratio=0.0")


def reference_step(tiny_assets, tiny_data) -> tuple[float, float, dict]:
    """The first step done by hand in one process: the global batch's 8 rows, loss = summed token
    losses / target tokens, clip, AdamW. Returns the loss, the gradient norm and the parameters."""
    import train.config  # noqa: F401
    from train.data import Plan, batch_arithmetic, collate, load_split, make_rows
    from train.model import load_model, load_tokenizer, token_losses
    cfg = compose_config("train", tiny_overrides(tiny_assets, tiny_data, *ONE_STEP))
    tokenizer = load_tokenizer(tiny_data)
    model = load_model(cfg.model, tokenizer, torch.float32, "sdpa")
    split = load_split(tiny_data, "train", None, cfg.data.max_seq_len)
    plan = Plan(split, make_rows(split.lengths, cfg.data.max_seq_len, False), batch_arithmetic(8, 4, 2, False),
                cfg.train.seed, cfg.data.max_seq_len)
    batch = collate(split, [plan.rows[r] for r in plan.step_rows(0)], tokenizer.pad_token_id, cfg.data.max_seq_len)
    loss = token_losses(model, batch).sum() / plan.step_statistics(0)["target_tokens"]
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optimizer.max_grad_norm)
    torch.optim.AdamW(model.parameters(), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
                      weight_decay=cfg.optimizer.weight_decay).step()
    return loss.item(), grad_norm.item(), {k: v.detach() for k, v in model.state_dict().items()}


def test_update_is_the_same_for_any_split_of_the_global_batch(tiny_assets, tiny_data, tmp_path):
    """micro 4 x accumulation 1 and micro 1 x accumulation 4 (x 2 processes) = one reference step."""
    reference_loss, reference_norm, reference = reference_step(tiny_assets, tiny_data)
    for micro in (4, 1):
        output_dir = tmp_path / f"micro{micro}"
        log = launch(output_dir, tiny_overrides(tiny_assets, tiny_data, *ONE_STEP, f"train.micro_batch_size={micro}"))
        assert_real_deepspeed(log, output_dir)
        assert f"2 processes x {micro} rows per micro batch x {4 // micro} accumulation steps" in log
        record = steps(output_dir)[1]
        assert record["loss"] == pytest.approx(reference_loss, rel=1e-5)
        assert record["grad_norm"] == pytest.approx(reference_norm, rel=1e-4)
        weights = load_file(output_dir / "model/model.safetensors")
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def test_a_qwen_family_base_trains_exports_and_is_evaluated_in_chatml(tiny_qwen_assets, tiny_chatml_data,
                                                                      tiny_chatml_user_model, tmp_path):
    """chat_format=chatml end to end: data_prep's chatml data from a Qwen-family base, trained under
    ZeRO-3, exported with its ChatML template and <|im_end|> as EOS, scored by perplexity (far below
    the untrained model's) and played by the simulator, each reading the format from the tokenizer."""
    import evaluate.config  # noqa: F401
    from evaluate.perplexity import run as perplexity
    from evaluate.simulator import GuardrailSettings, SamplingSettings, UserSimulator
    from transformers import AutoTokenizer, GenerationConfig
    output_dir = tmp_path / "chatml"
    log = launch(output_dir, tiny_overrides(tiny_qwen_assets, tiny_chatml_data, *MEMORISE[:-3], "train.epochs=3",
                                            "train.eval_every=0", "train.save_every=0"))
    assert_real_deepspeed(log, output_dir)
    history = steps(output_dir)
    assert sorted(history) == list(range(1, 7)) and history[6]["loss"] < 0.7 * history[1]["loss"]
    model_dir = output_dir / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_chatml_data / "tokenizer").chat_template
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == GenerationConfig.from_pretrained(model_dir).eos_token_id == im_end
    assert 'tokenizer.encode("<|im_end|>"' in (model_dir / "README.md").read_text()

    def ppl(model) -> float:
        cfg = compose_config("perplexity", [
            "experiment=tiny", f"model={model}", f"data_dirs.wildchat={tiny_chatml_data}",
            f"data_dirs.prism={tiny_chatml_data}", f"output_dir={tmp_path / 'results'}", "split=train", "limit=8",
            f"name={Path(model).parent.name}"])
        return json.loads(perplexity(cfg).read_text())["ppl"]
    trained, untrained = ppl(model_dir), ppl(tiny_chatml_user_model)
    assert trained < 0.2 * untrained, (trained, untrained)

    simulator = UserSimulator.from_pretrained(str(model_dir), SamplingSettings(max_new_tokens=8),
                                              GuardrailSettings(max_retries=1))
    torch.manual_seed(0)
    first = simulator.first_turn("You are a user chatting with an assistant language model to plan a trip.")
    assert first.text and not first.ended
