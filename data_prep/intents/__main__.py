"""`python -m data_prep.intents`: generate the task intents of the conversations data_prep keeps.

Same configuration as `python -m data_prep` (conf/data_prep/), same loading and filtering; only the
intents stage runs, filling the store at `intents.path` (resumable: run it again after a crash).

    # an OpenAI-compatible server you started (vLLM: `vllm serve meta-llama/Llama-3.1-8B-Instruct`)
    python -m data_prep.intents experiment=paper intents.backend=openai \\
        intents.openai.model=meta-llama/Llama-3.1-8B-Instruct intents.path=outputs/paper/intents.jsonl
    # OpenAI itself (the key is read from the variable named here, never stored)
    # (experiment=paper holds OpenAI's endpoint, gpt-4o and api_key_env=OPENAI_API_KEY)
    OPENAI_API_KEY=... python -m data_prep.intents experiment=paper intents.backend=openai
    # a local transformers model (the tiny one here; gibberish intents, working mechanics)
    python -m data_prep.intents experiment=tiny intents.backend=hf intents.hf.model=outputs/tiny/model \\
        intents.path=outputs/tiny/intents.jsonl intents.checks.require_prefix=null
"""

import hydra

import data_prep.config  # noqa: F401  (registers the config schema)
from data_prep.intents.generate import generate_intents
from data_prep.pipeline import select_conversations


def run(cfg) -> dict:
    return generate_intents(cfg.intents, select_conversations(cfg).kept())


@hydra.main(version_base="1.3", config_path="../../conf/data_prep", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
