"""`accelerate launch train/run.py`: full-parameter DeepSpeed fine-tuning of a user LM.

    # the tiny model on the embedded sample: 2 CPU processes, ZeRO-3, about a minute
    accelerate launch --config_file conf/accelerate/cpu.yaml train/run.py experiment=tiny
    # the paper's run (Llama-3-8B base) on one 8-GPU node, or on several (see the yaml's steps)
    accelerate launch --config_file conf/accelerate/8gpu.yaml train/run.py experiment=paper
    accelerate launch --config_file conf/accelerate/multinode.yaml train/run.py experiment=paper
    # other DeepSpeed settings, a different batch split, continuing a run that was stopped
    accelerate launch ... train/run.py experiment=paper deepspeed=conf/deepspeed/zero3_offload.json
    accelerate launch ... train/run.py experiment=paper train.micro_batch_size=2    # accumulation doubles
    accelerate launch ... train/run.py experiment=paper train.resume=auto           # (the default)

Reads data_prep's output (train and validation examples, its tokenizer); trains all parameters with
AdamW under DeepSpeed (ZeRO-3 by default) with the loss normalised per target token over the whole
global batch; evaluates validation loss/perplexity every N steps; checkpoints every M steps; and
exports the final model as complete HF safetensors. Rank 0 holds output_dir's lock for the whole
run (a second training on it fails at once, naming the holder) and refuses an output_dir, or a
model/ in it, holding files that training did not write, before any training starts. Workers die
with their launcher (a `kill -9` of `accelerate launch` stops the run). In `output_dir` (written
by rank 0 only):
    .userlm-stage (marks the folder as train's)  config.yaml  run_info.json  metrics.jsonl  wandb/
    checkpoints/step_XXXXXXXX/
    model/       safetensors, config.json, generation_config.json (EOS: <|eot_id|>, or <|im_end|> in chatml), tokenizer files
                 with the chat template, README.md (model card: config, data manifest, metrics);
                 loadable by transformers 4.x and 5.x alike (scripts/checkpoint_compat.py checks it)
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this worker when its launcher (the accelerate/torchrun process that
    started it: its parent) dies, even by SIGKILL. The launcher puts each worker in its own session,
    so without this a `kill -9` of the launcher leaves the workers training to the end and exporting
    model/, beside any rerun. SIGKILL, not SIGTERM: a library's handler cannot swallow it, and
    nothing is lost (checkpoints are renamed into place whole; metrics lines are single writes).
    Linux only (prctl); elsewhere a killed launcher's workers still run on."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal
    launcher = os.getppid()
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != launcher:  # it died before the signal was armed
        os._exit(1)


if __name__ == "__main__" and "LOCAL_RANK" in os.environ:  # started by a launcher, before the slow imports
    die_with_launcher()

# `accelerate launch train/run.py` runs this file as a script, which puts train/ first on sys.path;
# the repository root must be there instead (so `train` is this package, and train/*.py never
# shadow top-level modules such as `data` or `config` for other libraries).
REPO = Path(__file__).resolve().parents[1]
if Path(sys.path[0]).resolve() == REPO / "train":
    sys.path[0] = str(REPO)
# Padding to each micro batch's longest row changes tensor shapes every step: expandable segments
# keep the CUDA caching allocator from fragmenting (read at CUDA's first use; a value set outside wins).
if "PYTORCH_ALLOC_CONF" not in os.environ:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# Rank 0 alone writes the 16 GB export and deletes old checkpoints (~112 GB for an 8B) while the
# others wait in a collective: NCCL's default 10 minutes can run out on a slow filesystem.
COLLECTIVE_TIMEOUT = timedelta(hours=2)

import deepspeed  # noqa: E402
import hydra  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from tqdm import tqdm  # noqa: E402

import train.config  # noqa: E402,F401  (registers the config schema)
from core import artifacts  # noqa: E402
from data_prep.chat_format import IGNORE_INDEX  # noqa: E402
from train.checkpoint import find_resume_point, load_checkpoint, read_train_state, save_checkpoint  # noqa: E402
from train.data import Plan, batch_arithmetic, collate, evaluation_batches, load_split, make_rows  # noqa: E402
from train.metrics import MetricsLog, peak_flops_per_device, training_flops  # noqa: E402
from train.model import (check_tokenizer_matches_model, load_model, load_tokenizer, model_card,  # noqa: E402
                         resolve_attention, resolve_gradient_checkpointing, resolve_precision, save_model,
                         token_losses)
from train.optim import deepspeed_config, make_optimizer, warmup_cosine  # noqa: E402

log = logging.getLogger("train")
# DeepSpeed 0.19 calls collectives that torch 2.13 deprecates, once per parameter bucket and step.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def run(cfg) -> Path:
    """Train, with output_dir this run's alone: rank 0 holds its lock for the whole run and claims it
    (a second run on it, or a folder of someone else's files, fails at once), before the Accelerator
    exists, so a refusal stops the launch before any process group or training starts (torchrun
    then tears the other ranks down)."""
    output_dir = Path(cfg.output_dir)
    if int(os.environ.get("RANK", "0")) != 0:
        return train_model(cfg)
    with artifacts.owned_directory(output_dir, "train"):
        artifacts.check_replaceable(output_dir / "model", "train")  # refused now, not after training
        return train_model(cfg)


def train_model(cfg) -> Path:
    # ---- setup: batch arithmetic, DeepSpeed config, accelerator ------------------------------------
    output_dir, data_dir = Path(cfg.output_dir), Path(cfg.data.path)
    fingerprint = training_fingerprint(cfg, data_dir)
    if cfg.train.resume == "auto" and artifacts.is_complete(output_dir / "model") and \
            json.loads((output_dir / "run_info.json").read_text()).get("training_fingerprint") == fingerprint:
        log.info("%s already holds the model this config trains: nothing to do", output_dir / "model")
        return output_dir / "model"
    if os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true"):
        raise RuntimeError("ACCELERATE_USE_CPU is set (use_cpu: true in the accelerate config): accelerate would "
                           "silently run without DeepSpeed; use conf/accelerate/cpu.yaml on CPU")
    on_gpu = torch.cuda.is_available()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    arithmetic = batch_arithmetic(cfg.train.global_batch_size, cfg.train.micro_batch_size, world_size,
                                  cfg.train.round_global_batch)
    dtype = resolve_precision(cfg.model.precision)
    ds_path = Path(cfg.deepspeed) if Path(cfg.deepspeed).is_absolute() else REPO / cfg.deepspeed
    ds_config = deepspeed_config(ds_path, arithmetic, cfg.optimizer.max_grad_norm, bf16=dtype == torch.bfloat16,
                                 grad_accum_dtype=cfg.train.grad_accum_dtype)
    zero_stage = ds_config["zero_optimization"]["stage"]
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config, zero3_init_flag=zero_stage == 3),
        mixed_precision="bf16" if dtype == torch.bfloat16 else "no", gradient_accumulation_steps=arithmetic.accumulation,
        # Without an explicit gloo backend on CPU, accelerate's DeepSpeed path mis-sizes the batch.
        kwargs_handlers=[InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=COLLECTIVE_TIMEOUT)])
    if accelerator.num_processes != world_size:
        raise RuntimeError(f"WORLD_SIZE={world_size} but accelerate started {accelerator.num_processes} processes")
    main = accelerator.is_main_process
    if not main:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(cfg.train.seed)
    log.info("%s", arithmetic)

    # ---- data: examples -> rows -> a plan of which rows every process runs at every step ----------
    tokenizer = load_tokenizer(data_dir)
    train_split = load_split(data_dir, "train", cfg.data.max_train_examples, cfg.data.max_seq_len)
    validation = load_split(data_dir, "validation", cfg.data.max_validation_examples, cfg.data.max_seq_len)
    plan = Plan(train_split, make_rows(train_split.lengths, cfg.data.max_seq_len, cfg.data.packing), arithmetic,
                cfg.train.seed, cfg.data.max_seq_len)
    validation_rows = make_rows(validation.lengths, cfg.data.max_seq_len, cfg.data.packing)
    epoch = plan.epoch_statistics()
    total_steps = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch
    log.info("train: %d examples in %d rows (packing %s), %d steps per epoch (%d rows left out per epoch), "
             "%d tokens and %d target tokens per epoch, packing efficiency %.1f%% (non-pad / processed tokens); "
             "%d steps in all", epoch["examples"], epoch["rows"], cfg.data.packing, epoch["steps_per_epoch"],
             epoch["dropped_rows_per_epoch"], epoch["tokens_per_epoch"], epoch["target_tokens_per_epoch"],
             100 * epoch["packing_efficiency"], total_steps)
    log.info("per step: ~%d tokens (%d target tokens) = %s",
             epoch["tokens_per_epoch"] // epoch["steps_per_epoch"],
             epoch["target_tokens_per_epoch"] // epoch["steps_per_epoch"], arithmetic)

    # ---- model, optimiser, schedule under DeepSpeed -----------------------------------------------
    first_new_token = check_tokenizer_matches_model(tokenizer, cfg.model)
    attention = resolve_attention(cfg.model.attn_implementation)
    model = load_model(cfg.model, tokenizer, dtype, attention, first_new_token)
    checkpointing = resolve_gradient_checkpointing(cfg.model.gradient_checkpointing)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model, cfg.optimizer, ds_config)
    # Stepped by us once per optimizer step (accelerate's prepared scheduler would step once per
    # process), saved and restored with every checkpoint.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, cfg.optimizer.warmup_ratio, cfg.optimizer.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if not isinstance(model, deepspeed.DeepSpeedEngine):
        raise RuntimeError(f"accelerate prepared a {type(model).__name__}, not a DeepSpeed engine")
    unwrapped = accelerator.unwrap_model(model)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped.parameters())
    # The input embedding is a lookup, not a matmul (unless it is tied to the output layer, which is).
    lookup_params = 0 if unwrapped.config.tie_word_embeddings else unwrapped.config.vocab_size * unwrapped.config.hidden_size
    peak_flops = peak_flops_per_device(cfg.train.peak_tflops)
    setup = {"processes": accelerator.num_processes, "backend": dist.get_backend(),
             "deepspeed_zero_stage": model.zero_optimization_stage(), "device": str(accelerator.device),
             "dtype": str(dtype).removeprefix("torch."), "attention": attention, "gradient_checkpointing": checkpointing,
             "parameters": n_params, "global_batch_size": arithmetic.global_batch_size,
             "micro_batch_size": arithmetic.micro_batch_size, "gradient_accumulation": arithmetic.accumulation,
             "grad_accum_dtype": ds_config["data_types"]["grad_accum_dtype"]}
    log.info("run: %d processes, backend %s, DeepSpeed engine ZeRO stage %d, %s, %s attention, "
             "gradient checkpointing %s, %d parameters, gradients accumulated in %s", setup["processes"],
             setup["backend"], setup["deepspeed_zero_stage"], setup["dtype"], attention, checkpointing, n_params,
             setup["grad_accum_dtype"])

    # ---- resume, outputs ----------------------------------------------------------------------
    resume_from = find_resume_point(output_dir, cfg.train.resume)
    start_step = 0
    if resume_from is not None:
        state = read_train_state(resume_from)
        if state["plan_fingerprint"] != plan.fingerprint() or state["training_fingerprint"] != fingerprint:
            raise ValueError(f"{resume_from} was written with other data or training settings "
                             f"(plan {state['plan_fingerprint']} != {plan.fingerprint()} or training "
                             f"{state['training_fingerprint']} != {fingerprint}): cannot resume onto it")
        load_checkpoint(accelerator, resume_from)
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_from, start_step)
    config = artifacts.resolved_config(cfg)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        artifacts.write_json(output_dir / "run_info.json", {
            "setup": setup, "deepspeed_config": ds_config, "train_plan": epoch, "total_steps": total_steps,
            "plan_fingerprint": plan.fingerprint(), "training_fingerprint": fingerprint,
            "resumed_from": str(resume_from) if resume_from else None,
            "data_manifest": str(data_dir / "manifest.json"), "packages": artifacts.package_versions()})
    metrics = MetricsLog(output_dir, start_step, cfg.wandb, config, enabled=main)

    def evaluate(step: int) -> dict:
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad():
            for rows in evaluation_batches(validation, validation_rows, arithmetic.micro_batch_size,
                                           accelerator.num_processes, accelerator.process_index):
                batch = to_device(collate(validation, rows, tokenizer.pad_token_id, cfg.data.max_seq_len))
                sums[0] += token_losses(model, batch).sum().double()
                sums[1] += (batch["targets"] != IGNORE_INDEX).sum()
        total_loss, target_tokens = accelerator.reduce(sums, reduction="sum").tolist()
        model.train()
        loss = total_loss / target_tokens
        record = {"step": step, "val_loss": loss, "val_perplexity": math.exp(loss), "val_target_tokens": int(target_tokens)}
        log.info("step %d: validation loss %.4f, perplexity %.2f (%d target tokens)", step, loss, math.exp(loss),
                 target_tokens)
        metrics.write(record)
        return record

    def to_device(batch: dict) -> dict:
        return {k: v.to(accelerator.device) for k, v in batch.items()}

    # ---- loop -----------------------------------------------------------------------------------
    # The loss of a step is sum(token losses over the whole global batch) / its target tokens. Each
    # micro batch backpropagates its summed token losses x world / N: DeepSpeed averages gradients
    # over processes (hence x world) and is told not to divide by the accumulation steps, so the
    # update is the same for any split of the global batch into processes x micro x accumulation.
    model.train()
    last_eval = evaluate(start_step) if start_step == 0 and cfg.train.eval_every else None
    progress = tqdm(range(start_step, total_steps), desc="train", disable=not main, initial=start_step,
                    total=total_steps)
    for step in progress:
        started = time.perf_counter()
        stats = plan.step_statistics(step)
        scale = accelerator.num_processes / stats["target_tokens"]
        summed = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        lr = model.get_lr()[0]
        for rows in plan.micro_batches(step, accelerator.process_index):
            batch = to_device(collate(train_split, [plan.rows[r] for r in rows], tokenizer.pad_token_id,
                                      cfg.data.max_seq_len))
            with accelerator.accumulate(model):
                loss = token_losses(model, batch).sum()
                accelerator.backward(loss * scale, scale_wrt_gas=False)
            summed += loss.detach().double()
        scheduler.step()
        loss = accelerator.reduce(summed, reduction="sum").item() / stats["target_tokens"]
        seconds = time.perf_counter() - started
        record = {"step": step + 1, "epoch": step // plan.steps_per_epoch, "loss": loss, "lr": lr,
                  "grad_norm": float(model.get_global_grad_norm()), "tokens": stats["tokens"],
                  "target_tokens": stats["target_tokens"], "packing_efficiency": stats["packing_efficiency"],
                  "tokens_per_s": stats["tokens"] / seconds, "step_seconds": seconds}
        if peak_flops:
            flops = training_flops(n_params - lookup_params, unwrapped.config.num_hidden_layers,
                                   unwrapped.config.hidden_size, stats["tokens"], stats["squared_lengths"])
            record["mfu"] = flops / (seconds * accelerator.num_processes * peak_flops)
        metrics.write(record)
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if cfg.train.eval_every and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == total_steps):
            last_eval = evaluate(step + 1)
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < total_steps:
            metrics.sync()  # a checkpoint never refers to metrics that are not on disk
            save_checkpoint(accelerator, output_dir, step + 1, {"step": step + 1, "plan_fingerprint": plan.fingerprint(),
                                                                "training_fingerprint": fingerprint},
                            cfg.train.save_total_limit)

    # ---- save: complete HF weights, tokenizer, generation config, model card ----------------------
    state_dict = accelerator.get_state_dict(model)  # gathered from every process under ZeRO-3
    if main:
        with artifacts.atomic_directory(output_dir / "model", "train") as tmp:  # under run()'s lock
            written = save_model(unwrapped, state_dict, tokenizer, cfg.generation, tmp)
            manifest = json.loads((data_dir / "manifest.json").read_text())
            final = {"steps": total_steps, **(last_eval or {})}
            artifacts.write_text(tmp / "README.md", model_card(cfg.model.name_or_path, tokenizer.eos_token,
                                                                OmegaConf.to_yaml(cfg, resolve=True), manifest, final))
        log.info("exported %d parameters to %s", written, output_dir / "model")
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir / "model"


def training_fingerprint(cfg, data_dir: Path) -> str:
    """What determines the trained weights: the data (data_prep's manifest) and the recipe (the
    resolved config less its bookkeeping: where it is written, resuming, evaluation and checkpoint
    cadence, wandb)."""
    config = artifacts.resolved_config(cfg)
    del config["output_dir"]
    for key in ("resume", "eval_every", "save_every", "save_total_limit"):
        del config["train"][key]
    del config["wandb"]
    return artifacts.config_hash(config, artifacts.sha256_of(data_dir / "manifest.json"))


@hydra.main(version_base="1.3", config_path="../conf/train", config_name="config")
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
