"""Every stage's configuration: composition imports no model code, typos fail at composition, and
each preset composes to the values it states (the paper's recipe, the tiny CPU run)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

import data_prep.config  # noqa: F401  (registers the schemas before composing)
import evaluate.simulate_config  # noqa: F401
import train.config  # noqa: F401
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data_prep", "train", "perplexity", "simulate", "intrinsic", "table")


def test_composing_every_stage_config_imports_no_model_code():
    # A fresh interpreter: this test process has long imported torch through the fixtures.
    script = textwrap.dedent(f"""
        import sys
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf
        import data_prep.config, train.config, evaluate.config, evaluate.simulate_config
        for stage in {STAGES!r}:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str({str(REPO / "conf")!r} + "/" + stage), version_base="1.3"):
                # data_prep's output_dir holds ${{hydra:...}}, resolved only inside a Hydra run
                cfg = compose(config_name="config", overrides=["experiment=paper", "output_dir=out"])
            OmegaConf.to_container(cfg, resolve=True)
        heavy = [name for name in ("torch", "transformers", "datasets") if name in sys.modules]
        assert not heavy, f"composing the configs imported {{heavy}}"
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("stage,override,allowed", [
    ("data_prep", "flip.mode=per_turns", "per_turn, per_conversation"),
    ("data_prep", "filters.unanswered_last_turn=trimm", "keep_no_end, trim, drop"),
    ("data_prep", "split.missing_user=own", "own_user, drop"),
    ("data_prep", "intents.backend=vllm", "file, openai, hf"),
    ("data_prep", "data.kind=share_gpt", "wildchat, prism, lmsys, sharegpt, openai_messages"),
    ("perplexity", "mode=per_turns", "per_turn, per_conversation"),
    ("perplexity", "intent=tasks", "none, task, generic"),
    ("perplexity", "protocol=flipped", "userlm, flipped_chat"),
    ("perplexity", "missing_end_token=text", "plain_text, exclude"),
    ("simulate", "assistant.kind=hff", "hf, openai, scripted"),
    ("simulate", "user_model.protocol=user_lm", "userlm, flipped_chat"),
    ("intrinsic", "assistant.kind=hff", "hf, openai, scripted"),
    ("perplexity", "dtype=bf16", "auto, bfloat16, float16, float32"),
    ("simulate", "user_model.dtype=fp16", "auto, bfloat16, float16, float32"),
    ("data_prep", "intents.hf.dtype=half", "auto, bfloat16, float16, float32"),
    ("train", "model.precision=bfloat16", "auto, bf16, fp32"),
    ("train", "train.grad_accum_dtype=fp16", "fp32, bf16"),
])
def test_a_mode_typo_fails_at_composition(stage, override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(stage, [override])
    message = str(error.value.__cause__)
    assert f"Invalid value '{value}', expected one of [{allowed}]" in message and f"full_key: {key}" in message


def resolved(stage: str, overrides: list[str]) -> dict:
    from omegaconf import OmegaConf
    cfg = compose_config(stage, [*overrides, "output_dir=out"])  # data_prep's default needs a Hydra run
    return OmegaConf.to_container(cfg, resolve=True)


def test_presets_compose_to_the_values_they_state():
    # The paper's recipe: what each paper preset sets, as the paper (or our pinned choice) says.
    paper = resolved("data_prep", ["experiment=paper"])
    assert (paper["tokenizer"]["name_or_path"], paper["max_seq_len"], paper["flip"]["mode"]) == \
        ("meta-llama/Meta-Llama-3-8B", 2048, "per_turn")
    assert paper["intents"]["openai"] == {**resolved("data_prep", [])["intents"]["openai"],
                                          "base_url": "https://api.openai.com/v1", "model": "gpt-4o-2024-08-06",
                                          "api_key_env": "OPENAI_API_KEY", "price_input_per_million": 2.5,
                                          "price_output_per_million": 10.0}
    simulate = resolved("simulate", ["experiment=paper"])
    assert simulate["assistant"]["openai"]["model"] == "gpt-4o-2024-08-06"
    assert (simulate["intents"]["limit"], simulate["conversation"]["max_user_turns"]) == (2000, 10)
    assert simulate["sampling"] == {"do_sample": True, "temperature": 1.0, "top_p": 0.8, "top_k": 0,
                                    "max_new_tokens": 64}   # UserLM-8b's model card
    assert resolved("simulate", ["sampling=generation_config"])["sampling"]["temperature"] == 0.6
    intrinsic = resolved("intrinsic", ["experiment=paper"])
    assert (intrinsic["first_turns"], intrinsic["judge"]["client"]["model"]) == (2000, "gpt-4o-2024-08-06")
    # The tiny presets: CPU-sized, on the quickstart's outputs.
    tiny = resolved("simulate", ["experiment=tiny"])
    assert (tiny["user_model"]["name_or_path"], tiny["assistant"]["kind"], tiny["intents"]["limit"]) == \
        ("outputs/tiny/train/model", "hf", 8)
    assert resolved("perplexity", ["experiment=tiny"])["max_seq_len"] == 512
    assert resolved("data_prep", ["experiment=tiny"])["tokenizer"]["name_or_path"] == "outputs/tiny/tokenizer"


def test_shared_settings_are_written_once():
    from data_prep.chat_format import INTENT_PREFIX, PAD_TOKEN, USERLM
    data_prep, perplexity = resolved("data_prep", []), resolved("perplexity", [])
    simulate, intrinsic = resolved("simulate", []), resolved("intrinsic", [])
    # One endpoint client block (core.llm_client.ClientConfig), each stage changing only its own keys.
    clients = [data_prep["intents"]["openai"], simulate["assistant"]["openai"], intrinsic["assistant"]["openai"],
               intrinsic["judge"]["client"]]
    assert clients[1] == clients[2] == clients[3] == {**clients[0], "concurrency": 32}
    assert clients[1]["base_url"] == "http://localhost:8000/v1" and clients[1]["timeout_s"] == 120.0
    assert simulate["assistant"]["hf"] == intrinsic["assistant"]["hf"]   # one HFAssistantConfig
    # The constants of data_prep.chat_format, through ${chat_format:...}.
    assert data_prep["intents"]["checks"]["require_prefix"] == simulate["guardrails"]["repetition"]["intent_prefix"] \
        == intrinsic["intent_prefix"] == INTENT_PREFIX
    assert perplexity["generic_intent"].startswith(INTENT_PREFIX + " ")
    assert intrinsic["role_adherence"]["intent_template"].startswith(INTENT_PREFIX + " find out")
    assert perplexity["pad_token"] == simulate["user_model"]["pad_token"] \
        == simulate["assistant"]["hf"]["pad_token"] == intrinsic["assistant"]["hf"]["pad_token"] == PAD_TOKEN
    # data_prep's pad is the chat format's unless set (null), and userlm's is that same constant.
    assert data_prep["tokenizer"]["pad_token"] is None and USERLM.pad_token == PAD_TOKEN
    # The flipped_chat prompts, shared by perplexity and simulate.
    assert perplexity["flipped_chat"] == simulate["user_model"]["flipped_chat"]
    assert perplexity["flipped_chat"]["system_prompt_with_intent"].startswith("{intent} In this chat")
    from omegaconf.errors import InterpolationResolutionError
    with pytest.raises(InterpolationResolutionError, match="chat_format:PAD}: expected one of INTENT_PREFIX, PAD_TOKEN"):
        compose_config("perplexity", ["pad_token=${chat_format:PAD}"]).pad_token


def test_the_simulator_api_defaults_are_the_commands():
    # evaluate.simulator's settings classes read conf/simulate/: the importable API and
    # `python -m evaluate.simulate` sample and guard the same way unless told otherwise.
    from evaluate.simulator import GuardrailSettings, SamplingSettings
    cfg = compose_config("simulate", [])
    assert SamplingSettings() == SamplingSettings.card() == SamplingSettings(**cfg.sampling)
    generation_config = compose_config("simulate", ["sampling=generation_config"]).sampling
    assert SamplingSettings.generation_config() == SamplingSettings(**generation_config)
    assert GuardrailSettings() == GuardrailSettings.from_config(cfg.guardrails)
