"""Peak GPU memory per process of a training config, by component, and whether it fits. No GPU.

    # the paper preset (Llama-3-8B, micro batch 4 x 2048 tokens, ZeRO-3) on the paper's 4 x 48 GB
    python benchmarks/train_memory.py --gpus 4 --gpu-memory-gib 48
    # any train/run.py override after the options; --json writes the figures
    python benchmarks/train_memory.py --gpus 8 --gpu-memory-gib 80 experiment=paper_8x80gb --json plan.json
    python benchmarks/train_memory.py --gpus 4 --gpu-memory-gib 48 model.loss_chunk_tokens=null  # full logits

Components (GiB per GPU; `per_gpu_gib` is their sum):
  model_states     bf16 parameters, gradients, fp32 master weights and Adam moments under the
                   config's ZeRO stage, offload and gradient-accumulation dtype, from DeepSpeed's
                   own estimators (estimate_zero2/3_model_states_mem_needs; they count 4-byte
                   accumulated gradients, 2 bytes fewer per parameter and GPU when accumulating in bf16).
  activations      peak of the decoder's forward + backward on one micro batch (the config's
                   gradient checkpointing; `activations_gib` lists both settings).
  loss             what the output layer and loss add on top of that peak.
  working_buffers  ZeRO-3's gathered bf16 parameters (up to stage3_max_live_parameters), ZeRO's
                   reduce/prefetch/all-gather buckets, allowances for the CUDA context and NCCL
                   (CONTEXT_GIB) and for allocator fragmentation (ALLOCATOR_SLACK x activations + loss).
Activations and loss are measured, not modelled: the real model (train.model's loss included)
runs forward and backward at full size on the `meta` device (shapes, no data, no weights), and
every tensor storage created is counted until it is freed. Gradients of parameters are dropped as
they arrive (ZeRO reduce-scatters them into its partitions, counted in model_states). Attention
runs as a stand-in with flash-attention's memory: the output and log-sum-exp kept for backward,
dq/dk/dv (+ fp32 dq accumulator, GQA-expanded dk/dv) in it. The micro batch is full rows of
data.max_seq_len tokens (the worst case). `auto` settings resolve as on a GPU (bf16, gradient
checkpointing on). Also reported: host RAM per node for offloading configs (DeepSpeed's estimate).
"""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

import train.config  # noqa: E402,F401  (registers the train schema)
from scripts.hydra_compose import compose_config  # noqa: E402
from train.data import batch_arithmetic  # noqa: E402
from train.model import enable_token_losses, token_losses  # noqa: E402
from train.optim import deepspeed_config  # noqa: E402

GIB = 2 ** 30
CONTEXT_GIB = 1.5  # CUDA context (~0.5 GiB) and NCCL's buffers: an allowance, not measured
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a share of activations + loss (shapes vary by step)
# Model configs of hub ids this machine cannot download (a local directory's config.json is read instead).
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False),
}
MEMORY_ATTENTION = "fa2_memory"  # no "flash" in the name: transformers would try to load a flash kernel for it


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages that ops inside the block allocate and are still alive: now and
    at peak. Views and in-place results share a storage already counted, or one of `existing`
    (the model's parameters and buffers), which is never counted."""

    def __init__(self, existing):
        super().__init__()
        self.live = self.peak = 0
        self._existing = {id(t.untyped_storage()) for t in existing}
        self._tracked = set()  # ids of live storages (an id is reused only after its storage died)
        self._keep = [t.untyped_storage() for t in existing]  # so their ids stay theirs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._tracked or key in self._existing:
            return
        self._tracked.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, key, size)

    def _freed(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size


class _FlashAttentionMemory(torch.autograd.Function):
    """Shapes and allocations of flash-attn 2's forward and backward (no arithmetic)."""

    @staticmethod
    def forward(ctx, query, key, value):  # [batch, heads, seq, dim] as transformers passes them
        batch, heads, seq, dim = query.shape
        out = query.new_empty(batch, seq, heads, dim)
        log_sum_exp = query.new_empty(batch, heads, seq, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, log_sum_exp = ctx.saved_tensors
        expanded = query.new_empty(query.shape)  # dk, dv per query head before the GQA sum
        workspace = [query.new_empty(query.shape, dtype=torch.float32), torch.empty_like(log_sum_exp),
                     expanded, torch.empty_like(expanded)]
        del workspace
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def flash_attention_memory(module, query, key, value, attention_mask, **kwargs):
    return _FlashAttentionMemory.apply(query, key, value), None


def compose_train_config(overrides: list[str]):
    if not any(o.startswith("experiment=") for o in overrides):
        overrides = ["experiment=paper", *overrides]
    return compose_config("train", overrides)


def model_config(name_or_path: str, vocab_size: int | None):
    from transformers import AutoConfig
    if Path(name_or_path).is_dir():
        config = AutoConfig.from_pretrained(name_or_path)
    elif name_or_path in KNOWN_CONFIGS:
        known = dict(KNOWN_CONFIGS[name_or_path])
        config = AutoConfig.for_model(known.pop("model_type"), **known)
    else:
        raise ValueError(f"model.name_or_path={name_or_path!r}: not a local model directory and not one of "
                         f"{', '.join(KNOWN_CONFIGS)} (add its shapes to KNOWN_CONFIGS)")
    # data_prep's tokenizer adds <|endconversation|> to the model's vocabulary (train.model.resize_embeddings)
    config.vocab_size = vocab_size or config.vocab_size + 1
    return config


def measure(cfg, config, checkpointing: bool) -> dict:
    """Peak bytes of the decoder alone and with the output layer's loss, forward + backward; the
    parameter count and the largest module's."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    # No mask function is registered for it either: transformers then builds no mask (no data to read on meta).
    ALL_ATTENTION_FUNCTIONS.register(MEMORY_ATTENTION, flash_attention_memory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=MEMORY_ATTENTION)
    model.config.use_cache = False
    enable_token_losses(model, cfg.model.loss_chunk_tokens)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as train/run.py
    model.train()
    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    shape = (cfg.train.micro_batch_size, cfg.data.max_seq_len)
    peaks = {"parameters": sum(p.numel() for p in model.parameters()),
             "largest_layer": max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())}
    for part in ("decoder", "decoder_and_loss"):
        with AllocationTracker([*model.parameters(), *model.buffers()]) as tracker:
            batch = {"input_ids": torch.zeros(shape, dtype=torch.long, device="meta"),
                     "position_ids": torch.zeros(shape, dtype=torch.long, device="meta"),
                     "targets": torch.zeros(shape, dtype=torch.long, device="meta")}
            if part == "decoder":
                hidden = model.base_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                          use_cache=False).last_hidden_state
                hidden.backward(torch.ones_like(hidden))
                del hidden
            else:
                token_losses(model, batch).sum().backward()
            del batch
        peaks[part] = tracker.peak
    return peaks


def model_states(ds: dict, n_params: int, largest_layer: int, hidden: int, gpus: int, gpus_per_node: int) -> dict:
    """GPU bytes per process and host bytes per node, from DeepSpeed's estimators; ZeRO's buckets."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    zero = ds["zero_optimization"]
    nodes = -(-gpus // gpus_per_node)
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    offload_params = zero.get("offload_param", {}).get("device", "none") != "none"
    grad_accum = ds.get("data_types", {}).get("grad_accum_dtype", "bf16")
    if zero["stage"] == 3:
        host, gpu, gathered = estimate_zero3_model_states_mem_needs(
            n_params, largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer or offload_params,
            cpu_offload_params=offload_params, zero_init=True)
        # DeepSpeed's allowance for the largest layer gathered (bf16 weight + gradient) is replaced: its
        # gradient is measured with the activations, and ZeRO-3 keeps up to stage3_max_live_parameters
        # gathered at once (bf16), or the largest layer if that is more
        gpu -= gathered
        live = bucket(zero, "stage3_max_live_parameters", 1e9, 1e9)
        gathered = 2 * max(largest_layer, min(live, n_params))
        # hpZ keeps a second, node-local partition of the bf16 parameters (gathers within the node)
        if zero.get("zero_hpz_partition_size", 1) > 1:
            gpu += 2 * n_params // zero["zero_hpz_partition_size"]
        buckets = 2 * (bucket(zero, "reduce_bucket_size", 5e8, hidden * hidden)
                       + bucket(zero, "stage3_prefetch_bucket_size", 5e7, 0.9 * hidden * hidden))
    else:
        host, gpu = estimate_zero2_model_states_mem_needs(n_params, gpus_per_node, nodes,
                                                          cpu_offload=offload_optimizer)
        gathered = 0
        buckets = 2 * (bucket(zero, "reduce_bucket_size", 5e8, hidden * hidden)
                       + bucket(zero, "allgather_bucket_size", 5e8, hidden * hidden))
    if grad_accum in ("bf16", "fp16") and not offload_optimizer:
        gpu -= 2 * n_params // gpus  # the estimators count fp32 (4-byte) gradient partitions
    return {"gpu": gpu, "host_per_node": host if (offload_optimizer or offload_params) else 0,
            "gathered": gathered, "buckets": buckets, "grad_accum_dtype": grad_accum}


def bucket(zero: dict, key: str, default: float, auto: float) -> int:
    """Elements of a ZeRO bucket: DeepSpeed's default, or "auto" as accelerate fills it from the hidden size."""
    value = zero.get(key, default)
    return int(auto if value == "auto" else float(value))


def plan(overrides: list[str], gpus: int, gpu_memory_gib: float, gpus_per_node: int | None = None,
         vocab_size: int | None = None) -> dict:
    cfg = compose_train_config(overrides)
    gpus_per_node = gpus_per_node or min(gpus, 8)
    if cfg.model.precision not in ("auto", "bf16"):
        raise ValueError(f"model.precision={cfg.model.precision}: the planner plans bf16 GPU training")
    checkpointing = cfg.model.gradient_checkpointing is not False  # null: on, as on a GPU
    config = model_config(cfg.model.name_or_path, vocab_size)
    arithmetic = batch_arithmetic(cfg.train.global_batch_size, cfg.train.micro_batch_size, gpus,
                                  cfg.train.round_global_batch)
    ds_path = Path(cfg.deepspeed) if Path(cfg.deepspeed).is_absolute() else REPO / cfg.deepspeed
    ds = deepspeed_config(ds_path, arithmetic, cfg.optimizer.max_grad_norm, bf16=True,
                          grad_accum_dtype=cfg.train.grad_accum_dtype)
    measured = {flag: measure(cfg, config, flag) for flag in (checkpointing, not checkpointing)}
    n_params, largest_layer = measured[checkpointing]["parameters"], measured[checkpointing]["largest_layer"]
    states = model_states(ds, n_params, largest_layer, config.hidden_size, gpus, gpus_per_node)
    peaks = measured[checkpointing]
    components = {
        "model_states": states["gpu"] / GIB,
        "activations": peaks["decoder"] / GIB,
        "loss": max(0, peaks["decoder_and_loss"] - peaks["decoder"]) / GIB,
    }
    components["working_buffers"] = ((states["gathered"] + states["buckets"]) / GIB + CONTEXT_GIB
                                     + ALLOCATOR_SLACK * (components["activations"] + components["loss"]))
    per_gpu = sum(components.values())
    return {  # GiB, unrounded (a tiny model's figures are small)
        "per_gpu_gib": per_gpu, "fits": per_gpu <= gpu_memory_gib, "margin_gib": gpu_memory_gib - per_gpu,
        "components": components,
        "activations_gib": {f"gradient_checkpointing_{str(flag).lower()}": m["decoder"] / GIB
                            for flag, m in measured.items()},
        "host_ram_gib_per_node": states["host_per_node"] / GIB,
        "setup": {"gpus": gpus, "gpus_per_node": gpus_per_node, "gpu_memory_gib": gpu_memory_gib,
                  "model": cfg.model.name_or_path, "parameters": n_params, "vocab_size": config.vocab_size,
                  "micro_batch_size": cfg.train.micro_batch_size, "seq_len": cfg.data.max_seq_len,
                  "gradient_accumulation": arithmetic.accumulation, "gradient_checkpointing": checkpointing,
                  "loss_chunk_tokens": cfg.model.loss_chunk_tokens, "deepspeed": cfg.deepspeed,
                  "zero_stage": ds["zero_optimization"]["stage"], "grad_accum_dtype": states["grad_accum_dtype"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, required=True, help="processes (GPUs) in all")
    parser.add_argument("--gpu-memory-gib", type=float, required=True, help="memory of one GPU")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="default: min(gpus, 8)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the data tokenizer's size (default: the model's vocabulary + <|endconversation|>)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("overrides", nargs="*", help="train/run.py overrides (default experiment=paper)")
    args = parser.parse_args()
    result = plan(args.overrides, args.gpus, args.gpu_memory_gib, args.gpus_per_node, args.vocab_size)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2, default=str))
    s = result["setup"]
    print(f"{s['model']} ZeRO-{s['zero_stage']}, micro {s['micro_batch_size']} x {s['seq_len']} on {s['gpus']} x "
          f"{s['gpu_memory_gib']:g} GiB: {result['per_gpu_gib']:.1f} GiB per GPU -> "
          f"{'fits' if result['fits'] else 'does NOT fit'} ({result['margin_gib']:+.1f} GiB); "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["components"].items()))


if __name__ == "__main__":
    main()
