# Sourced by the scripts: the project's environment. Nothing is fetched from a model or dataset hub
# unless HF_HUB_OFFLINE=0 is set by the caller; wandb runs offline unless WANDB_MODE is set.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-$HF_HUB_OFFLINE}" WANDB_MODE="${WANDB_MODE:-offline}"
export DS_ACCELERATOR="${DS_ACCELERATOR:-$(command -v nvidia-smi >/dev/null && echo cuda || echo cpu)}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
