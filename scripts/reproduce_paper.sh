#!/usr/bin/env bash
# The paper's reproduction end to end, as a commented list of commands (the full-size twin of
# scripts/quickstart.sh). Needs: the hub (HF_HUB_OFFLINE=0, a token with access to
# meta-llama/Meta-Llama-3-8B), an intent writer (OPENAI_API_KEY for GPT-4o, or a vLLM server), and
# GPUs. Sizes and times are the paper's or estimates; none was measured on this project's machines.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 TRANSFORMERS_OFFLINE=0
py=.venv/bin/python

# 1. Intents, then flipped data (WildChat-1M, 837,989 conversations -> ~384k kept -> ~1.05M
#    per-turn train samples). Intents: ~384k GPT-4o calls, hours, cached and resumable.
#    Pin the dataset revision for a reproducible funnel: data.revision=<commit sha>.
$py -m data_prep experiment=paper intents.backend=openai intents.path=outputs/paper/intents.jsonl
$py -m data_prep experiment=paper dataset=prism intents.backend=openai intents.path=outputs/paper/intents.jsonl

# 2. Fine-tune Llama-3-8B base: full parameters, ZeRO-3, seq 2048, batch 1024, lr 2e-5
#    (~1,023 steps per epoch; the paper: 227 hours on 4 x RTX A6000).
.venv/bin/accelerate launch --config_file conf/accelerate/8gpu.yaml train/run.py experiment=paper

# 3. Perplexity table: our model, the released UserLM-8b, and the paper's baselines.
$py -m evaluate.perplexity -m experiment=paper model=outputs/paper/train/model name=ours-8b \
    dataset=wildchat,prism intent=none,task
$py -m evaluate.perplexity -m experiment=paper model=microsoft/UserLM-8b dataset=wildchat,prism intent=none,task
$py -m evaluate.perplexity -m experiment=paper model=meta-llama/Meta-Llama-3-8B dataset=wildchat,prism intent=none,task
$py -m evaluate.perplexity -m experiment=paper model=meta-llama/Meta-Llama-3-8B-Instruct protocol=flipped_chat \
    dataset=wildchat,prism intent=none,task

# 4. Simulation with the paper's guardrails (UserLM-8b vs GPT-4o on 2,000 test intents), the six
#    intrinsic metrics (GPT-4o judges; PRISM for termination). The user LM is served by vLLM and
#    driven over /v1/completions, many conversations in flight (user_model.backend=openai;
#    README "A served user LM"); drop the three `served` overrides to run it in this process.
vllm serve microsoft/UserLM-8b --port 8000 & user_lm_server=$!
vllm serve outputs/paper/train/model --port 8001 & ours_server=$!
trap 'kill $user_lm_server $ours_server' EXIT
until curl -sf localhost:8000/v1/models >/dev/null && curl -sf localhost:8001/v1/models >/dev/null; do sleep 10; done
served() { echo user_model.backend=openai user_model.openai.base_url=http://localhost:$1/v1 user_model.openai.model=$2; }
$py -m evaluate.simulate experiment=paper $(served 8000 microsoft/UserLM-8b)
$py -m evaluate.intrinsic experiment=paper simulation=outputs/paper/simulate/microsoft--UserLM-8b
$py -m evaluate.simulate experiment=paper user_model.name_or_path=outputs/paper/train/model \
    $(served 8001 outputs/paper/train/model)
$py -m evaluate.intrinsic experiment=paper simulation=outputs/paper/simulate/outputs--paper--train--model

# 5. Extrinsic evaluation (Table 3): 65 LiC tasks (33 math, 32 HumanEval code) x 10 conversations per
#    user simulator, GPT-4o as the assistant, the grading judge and the metrics' judge. Per simulator
#    650 conversations (README "Extrinsic evaluation": the cost). Pin the hub dataset by adding
#    tasks.revision=<commit sha of microsoft/lost_in_conversation> to each command.
served_user() { echo user.user_lm.model.backend=openai user.user_lm.model.openai.base_url=http://localhost:$1/v1 \
    user.user_lm.model.openai.model=$2; }
$py -m evaluate.extrinsic experiment=paper $(served_user 8000 microsoft/UserLM-8b)
$py -m evaluate.extrinsic experiment=paper user.kind=prompted_llm \
    user.prompted_llm.client.model=gpt-4o-mini-2024-07-18 name=prompted_llm--gpt-4o-mini
$py -m evaluate.extrinsic experiment=paper user.kind=prompted_llm \
    user.prompted_llm.client.model=gpt-4o-2024-08-06 name=prompted_llm--gpt-4o
$py -m evaluate.extrinsic experiment=paper user.user_lm.model.name_or_path=outputs/paper/train/model \
    $(served_user 8001 outputs/paper/train/model)

# 6. Every paper table: perplexity, intrinsic (Table 2), extrinsic (Table 3), the data funnel.
$py -m evaluate.table experiment=paper
