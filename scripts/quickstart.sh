#!/usr/bin/env bash
# The whole pipeline on the embedded sample, on CPU, in about 4 minutes (the CPU-sized twin of
# scripts/reproduce_paper.sh). Every step's output lands under outputs/tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
py=.venv/bin/python

# 1. Tiny assets (~10 s): a BPE tokenizer trained on the sample, a random 0.3M-parameter Llama.
$py scripts/make_tiny_assets.py --out outputs/tiny
# 2. data_prep (~10 s each): WildChat-schema sample -> funnel -> user split -> flipped examples
#    (intents from the sample's hand-written file), and the PRISM-schema sample as an evaluation set.
$py -m data_prep experiment=tiny
$py -m data_prep experiment=tiny dataset=prism
# 3. Intents from a local model (~45 s): the tiny random model writes (gibberish) intents for 40
#    conversations, then data_prep flips them: the mechanics of GPT-4o or vLLM at full scale.
$py -m data_prep experiment=tiny intents.backend=hf intents.hf.model=outputs/tiny/model \
    intents.path=outputs/tiny/intents.jsonl output_dir=outputs/tiny/data/generated_intents data.limit=40 \
    intents.checks.require_prefix=null intents.checks.reject_truncated=false intents.generation.max_tokens=8 \
    intents.generation.output_retries=0 intents.prompt.budget.conversation_tokens=200
# 4. Train (~1.5 min): the tiny Llama, 2 CPU processes, DeepSpeed ZeRO-3 over gloo; validation
#    perplexity ~2000 -> ~35. Writes outputs/tiny/train/model (HF safetensors, tokenizer, model card).
.venv/bin/accelerate launch --config_file conf/accelerate/cpu.yaml train/run.py experiment=tiny
# 5. Perplexity (~10 s each) on the sample's test split and the PRISM sample, with and without
#    intent: the untrained tiny model (no <|endconversation|> row: scored as plain text, like
#    Llama-3 base) and the trained one. The trained one must come out far lower.
$py -m evaluate.perplexity -m experiment=tiny model=outputs/tiny/model name=tiny-untrained \
    dataset=wildchat,prism intent=none,task
$py -m evaluate.perplexity -m experiment=tiny model=outputs/tiny/train/model name=tiny-trained \
    dataset=wildchat,prism intent=none,task
# 6. Simulate (~30-60 s): the trained tiny user LM, with the paper's guardrails, against the random
#    tiny model as assistant, for 8 intents of the test split; then the intrinsic metrics of those
#    conversations (diversity, intent decomposition, termination on the PRISM sample).
$py -m evaluate.simulate experiment=tiny
$py -m evaluate.intrinsic experiment=tiny
# 7. Extrinsic evaluation (~30 s): the trained tiny user LM reveals 4 of the embedded LiC-layout tasks
#    (2 math, 2 code) to the random tiny model, twice each, rule grading; then the deterministic
#    verbatim_shards user against a scripted assistant (asks once, then answers), the floor of the
#    diversity metrics. -> outputs/tiny/results/extrinsic/<user>/{transcripts.jsonl,extrinsic.json}
$py -m evaluate.extrinsic experiment=tiny
$py -m evaluate.extrinsic experiment=tiny user.kind=verbatim_shards assistant.kind=scripted
# 8. The paper's tables with ours beside them (perplexity, intrinsic, extrinsic, the data funnel):
#    outputs/tiny/results/tables/.
$py -m evaluate.table experiment=tiny
