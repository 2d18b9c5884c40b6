"""Checkpoints that load everywhere: train's `model/` export and data_prep's `tokenizer/` load, and
run UserLM-8b's published snippet alike, under transformers 4.57.6 and the project's 5.x.

scripts/checkpoint_compat.py does the work: 4.57.6 is installed beside the venv by
scripts/setup_transformers4.sh (from PyPI, about 20 s the first time on a machine; then cached in
.venv/transformers-4.57.6) and shadows 5.x through PYTHONPATH in a subprocess. Slow: two
subprocesses that each import torch and transformers.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import train.config  # noqa: F401  (registers the train schema)
from data_prep.chat_format import END_CONVERSATION, SYSTEM, ChatEncoder
from scripts.checkpoint_compat import CONVERSATION, INTENT, MAX_NEW_TOKENS, compare
from tests.conftest import compose_config
from train.model import load_model, load_tokenizer, save_model


@pytest.mark.slow
@pytest.mark.parametrize("base, data", [("tiny_assets", "tiny_data"), ("tiny_qwen_assets", "tiny_chatml_data")],
                         ids=["userlm", "chatml"])
def test_export_and_data_tokenizer_run_the_snippet_alike_under_transformers_4_and_5(base, data, request, tmp_path):
    """For each chat format: a Llama-3-family base in userlm, a Qwen-family base in chatml."""
    tiny_assets, tiny_data = request.getfixturevalue(base), request.getfixturevalue(data)
    tokenizer = load_tokenizer(tiny_data)  # data_prep's tokenizer/, as train/run.py loads it
    cfg = compose_config("train", ["experiment=tiny", f"model.name_or_path={tiny_assets / 'model'}"])
    model = load_model(cfg.model, tokenizer, torch.float32, "sdpa")
    # train/run.py's export, given the full state dict as it gathers it from ZeRO-3 (no DeepSpeed here).
    save_model(model, model.state_dict(), tokenizer, cfg.generation, tmp_path / "model")
    directories = [tmp_path / "model", tiny_data / "tokenizer"]

    current, older, found = compare(directories)
    assert (current["transformers"], older["transformers"]) == (transformers.__version__, "4.57.6")
    assert found == []
    # Not two runs failing alike: under 4.57.6 both loaded and did what the format says.
    export, data_tokenizer = (older[str(d)] for d in directories)
    encoder = ChatEncoder(tokenizer)
    assert export["prompt_ids"] == encoder.prompt_ids([{"role": SYSTEM, "content": INTENT}])
    assert export["conversation_ids"] == data_tokenizer["conversation_ids"] == encoder.prompt_ids(CONVERSATION)
    end_conversation = tokenizer.convert_tokens_to_ids(END_CONVERSATION)
    assert export["end_conv_token_id"] == [end_conversation] and export["end_token_id"] == [tokenizer.eos_token_id]
    assert export["added_tokens"][str(end_conversation)] == [END_CONVERSATION, False]
    assert data_tokenizer["text_decoded"] == export["text_decoded"] and "prompt_logits" not in data_tokenizer
    for name in ("prompt", "conversation"):
        generated = export[f"{name}_generated_ids"]
        assert 0 < len(generated) <= MAX_NEW_TOKENS and end_conversation not in generated, generated
