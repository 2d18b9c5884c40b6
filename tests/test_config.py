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
    ("data_prep", "data.kind=sharegpt", "wildchat, prism"),
    ("perplexity", "mode=per_turns", "per_turn, per_conversation"),
    ("perplexity", "intent=tasks", "none, task, generic"),
    ("perplexity", "protocol=flipped", "userlm, flipped_chat"),
    ("perplexity", "missing_end_token=text", "plain_text, exclude"),
    ("simulate", "assistant.kind=hff", "hf, openai, scripted"),
    ("simulate", "user_model.protocol=user_lm", "userlm, flipped_chat"),
    ("intrinsic", "assistant.kind=hff", "hf, openai, scripted"),
])
def test_a_mode_typo_fails_at_composition(stage, override, allowed):
    key, value = override.split("=")
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(stage, [override])
    message = str(error.value.__cause__)
    assert f"Invalid value '{value}', expected one of [{allowed}]" in message and f"full_key: {key}" in message
