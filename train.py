"""Train the Whispering-LLaMA adapters (AiL + AiW) with Lightning Fabric. The LLM and Whisper stay frozen.

    python train.py                                   # WL-M on the demo corpus (data/demo), embedded models, CPU
    python train.py --max-steps 50                    # a short run; prints tokens/s
    python train.py --variant S --no-whisper          # an ablation: the text-only adapter
    python train.py --out out/wl-m --resume           # continue an interrupted run exactly where it stopped
    python train.py --devices 2 --strategy ddp        # data parallel (gloo on CPU, NCCL on GPUs)

Every setting, its default and its flag is a field of `Run` below (grouped: data and models, model variant and
ablations, optimisation, system). The recipe is the paper's (DESIGN.md §1): AdamW, lr 1e-3 decayed linearly to 1e-5 over all optimizer steps,
weight decay 0.02, effective batch 32 (micro-batches + gradient accumulation), 25 epochs with early stopping on
dev WER, cross-entropy on the response tokens only.

The loss of one optimizer step is the mean over the labelled tokens of the whole effective batch: each
micro-batch contributes the *sum* of its per-token losses divided by the token count of the effective batch
(counted, over all processes, before the accumulation loop). So 4 micro-batches of 2 give exactly the gradient
of one batch of 8, however the tokens are spread over the examples.

Logits are computed only where there is a label (the model's `logits_mask`): the prompt is most of every
sequence and the lm_head is the largest matmul of a small LLM.

Output folder (--out):
    config.json        the settings of the run, including the model's WLConfig
    log.csv            step, epoch, loss, lr, tokens/s, val loss, dev WER
    curves.png         those curves (matplotlib)
    last.safetensors   the adapters at the last checkpoint (adapter tensors only: a few MB)
    best.safetensors   the adapters with the best dev WER so far
    state.ckpt         everything --resume needs: adapters, optimizer, scheduler, progress, data order, RNG states
"""
import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from adapter import AdapterBlock, is_adapter_param
from convert_checkpoint import SMOLLM2_DIR, ensure_llm, ensure_whisper
import generate  # generate.correct by module attribute, so that tests can replace it
from generate import cpu_bf16_is_faster
from model import Block
from prepare_data import IGNORE_INDEX, PreparedDataset, collate, summary, word_errors
from storage import ProjectError, first_line, write_atomic
from tokenizer import Tokenizer
from whisper_model import Whisper
from wl_checkpoint import build_model, load_adapter_file, save_adapter

ROOT = Path(__file__).resolve().parent


def setting(default, help, group, flag=None, recipe=True, adapter=None, **argparse_kwargs):
    """One setting of a run: its default, its --help line and group, and its place in the recipe.
    flag: the command-line flag when it is not the name with dashes (--lr for learning_rate).
    recipe: it defines the run, so --resume takes it from the run's config.json (the others, such as the
    devices or the precision, may change between sessions). adapter: the WLConfig field it sets, with a
    leading "not " when the flag negates it (--no-whisper → use_whisper=False)."""
    meta = dict(help=help, group=group, flag=flag, recipe=recipe, adapter=adapter, argparse=argparse_kwargs)
    return field(default=default, metadata=meta)


DATA, MODEL, OPTIM, SYSTEM = "data and models", "model variant and ablations", "optimisation", "system"


@dataclass
class Run:
    """The settings of one training run: the recipe, the flags of `python train.py --help` (build_parser) and
    the adapter's WLConfig fields (adapter_settings) all come from here. The names are the flags' (and what
    every run's config.json records under "run", so that older run folders resume)."""

    # --- data and models
    data: str = setting(str(ROOT / "data" / "demo"), "prepared folder (default data/demo; make it with "
                        "prepare_data.py)", DATA)
    llm: Optional[str] = setting(None, "LLM checkpoint folder (default: the embedded SmolLM2-135M-Instruct)", DATA)
    whisper: Optional[str] = setting(None, "Whisper name or checkpoint folder whose decoder cross-attention "
                                     "initialises AiW; must be the model that produced the data's audio features "
                                     "(default: read from the data's meta.json)", DATA)
    adapter: Optional[str] = setting(None, "start from this adapter checkpoint instead of the paper's init", DATA)
    out: Optional[str] = setting(None, "output folder (default out/wl-<variant>[-<ablation>])", DATA, recipe=False)
    # --- the model: adapter.WLConfig's adapter fields
    variant: str = setting("M", "WL-L, WL-M or WL-S (default M)", MODEL, adapter="variant", choices=("L", "M", "S"))
    kv_layout: str = setting("heads", "how Whisper keys/values split into heads; 'paper' reproduces the reference "
                             "code", MODEL, adapter="kv_layout", choices=("heads", "paper"))
    prompt_length: int = setting(10, "AiL prefix length (default 10; 40 with --no-whisper is the paper's \"big "
                                 "adapter\")", MODEL, adapter="adapter_prompt_length")
    start_layer: int = setting(2, "first block with adapters (default 2)", MODEL, adapter="adapter_start_layer")
    no_whisper: bool = setting(False, "text-only adapter (no AiW)", MODEL, adapter="not use_whisper")
    random_audio: bool = setting(False, "ablation: standard normal noise instead of the audio features", MODEL,
                                 adapter="random_audio")
    random_init: bool = setting(False, "ablation: random instead of identity initialisation of the AiW matrices",
                                MODEL, adapter="not identity_init")
    trim_audio: bool = setting(False, "attend only to the encoder frames that carry audio, not the whole 30 s "
                               "window (faster, less memory; not the paper's setting)", MODEL, adapter="trim_audio")
    no_mask: bool = setting(False, "ablation: the loss covers the prompt tokens too", MODEL)
    # --- optimisation: the paper's recipe (AdamW, linear decay, effective batch 32, 25 epochs, early stopping)
    learning_rate: float = setting(1e-3, "peak AdamW lr (1e-3)", OPTIM, flag="--lr", metavar="LR")
    min_lr: float = setting(1e-5, "lr at the last step (1e-5): linear decay over all optimizer steps", OPTIM)
    weight_decay: float = setting(0.02, "AdamW weight decay (0.02)", OPTIM)
    batch_size: int = setting(32, "effective batch size (32): micro-batch × accumulation steps × processes", OPTIM,
                              flag="--batch", metavar="N")
    micro_batch_size: int = setting(4, "examples per forward pass (4); the rest is gradient accumulation", OPTIM,
                                    flag="--micro-batch", metavar="N", recipe=False)
    epochs: int = setting(25, "epochs (25); the lr schedule spans all of them", OPTIM)
    max_steps: Optional[int] = setting(None, "stop after this many optimizer steps in total (the schedule is "
                                       "unchanged: resume later)", OPTIM, recipe=False, type=int)
    patience: int = setting(5, "early stopping: evaluations without a better dev WER (default 5)", OPTIM)
    eval_every: int = setting(0, "also evaluate and checkpoint every N steps (default: at each epoch's end only)",
                              OPTIM)
    dev_limit: int = setting(100, "dev utterances decoded for the WER (default 100; 0: val loss only, which early "
                             "stopping then uses)", OPTIM)
    seed: int = setting(1337, "random seed (1337)", OPTIM)
    resume: bool = setting(False, "continue the run in --out from its last checkpoint, exactly as if never "
                           "interrupted", OPTIM, recipe=False)
    overwrite: bool = setting(False, "start a new run in an --out that already holds one", OPTIM, recipe=False)
    # --- system: may change between the sessions of one run
    accelerator: str = setting("auto", "auto | cpu | cuda | mps", SYSTEM, recipe=False)
    devices: int = setting(1, "devices (processes) per node", SYSTEM, recipe=False)
    num_nodes: int = setting(1, "nodes", SYSTEM, recipe=False)
    strategy: str = setting("auto", "auto | ddp | fsdp | deepspeed", SYSTEM, recipe=False,
                            choices=("auto", "ddp", "fsdp", "deepspeed"))
    precision: Optional[str] = setting(
        None, "bf16: frozen weights in bf16, adapters fp32, bf16 autocast; bf16-true: everything bf16 (loses small "
        "updates to weights near 1); bf16-mixed: fp32 weights, bf16 autocast; 16-mixed (GPU); 32. Default: bf16 on "
        "a GPU with bf16, 16-mixed on other GPUs, 32 on CPU", SYSTEM, recipe=False,
        choices=("bf16", "bf16-true", "bf16-mixed", "16-mixed", "32", "32-true"))
    threads: Optional[int] = setting(None, "CPU threads per process (default: torch's choice; 1 is faster on a busy "
                                     "machine)", SYSTEM, recipe=False, type=int)
    # --- recorded during the session (not flags): this session's command line, the data's n-best form, provenance
    argv: Optional[list] = None
    hypotheses: Optional[str] = None
    provenance: Optional[dict] = None


FLAGS = {f.name: f for f in fields(Run) if f.metadata}
RECIPE = tuple(name for name, f in FLAGS.items() if f.metadata["recipe"])


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return FLAGS[name].metadata["flag"] or "--" + name.replace("_", "-")


def adapter_settings(run: Run) -> dict:
    """The WLConfig fields the run sets (use_whisper=not no_whisper, ...)."""
    out = {}
    for name, f in FLAGS.items():
        target = f.metadata["adapter"]
        if target:
            negate = target.startswith("not ")
            out[target.removeprefix("not ")] = not getattr(run, name) if negate else getattr(run, name)
    return out


class TrainError(ProjectError):
    """A problem with the inputs or the run that the user must fix (one-line message, no traceback)."""


class Diverged(Exception):
    """The loss or the gradients became NaN/inf."""


# -----------------------------------------------------------------------------------------------------
# Loss
# -----------------------------------------------------------------------------------------------------


def make_batch(items, mask_prompt=True):
    """collate() a list of dataset items. mask_prompt=False (--no-mask) trains on the prompt tokens too:
    every real token is a label; only the padding stays IGNORE_INDEX."""
    if not mask_prompt:
        items = [{**item, "labels": item["ids"].clone()} for item in items]
    batch = collate(items, pad_id=0)  # any pad id works: padding sits after the text and has no label
    batch["n_tokens"] = sum(len(item["ids"]) for item in items)  # real tokens, for tokens/s
    return batch


def count_labels(batch) -> int:
    """Positions that are scored: t where labels[t+1] is a label (the token at t predicts the one at t+1)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def micro_batch_loss(model, batch, use_audio=True):
    """(sum of the per-token cross-entropies, number of labelled tokens) of one micro-batch.

    Only the positions whose next token is labelled reach the lm_head (logits_mask)."""
    inputs, targets = batch["ids"][:, :-1], batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX  # (B, T-1)
    audio = batch["audio_features"] if use_audio else None
    metas = batch.get("meta") or []  # n_frames: the frames that carry audio (used with --trim-audio)
    frames = max((m.get("n_frames", audio.shape[1]) for m in metas), default=None) if audio is not None else None
    logits = model(inputs, audio, logits_mask=mask, audio_frames=frames)  # (N, vocab) at the N labelled positions
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum"), int(mask.sum())


def accumulate_gradients(fabric, model, micro_batches, use_audio=True):
    """Forward and backward over the micro-batches of one optimizer step (this process's share).

    Returns (mean loss over the labelled tokens of the whole effective batch, real tokens processed), both
    summed over all processes. Gradients are synchronised on the last micro-batch only."""
    device = fabric.device
    counts = torch.tensor([sum(count_labels(b) for b in micro_batches),
                           sum(b["n_tokens"] for b in micro_batches)], dtype=torch.float64, device=device)
    counts = fabric.all_reduce(counts, reduce_op="sum") if fabric.world_size > 1 else counts
    n_labels = max(counts[0].item(), 1.0)
    # DDP/FSDP average the gradients over the processes; multiplying by world_size turns that average into
    # the sum over all processes, so the result is the mean over every labelled token of the effective batch.
    scale = fabric.world_size / n_labels
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        is_accumulating = i < len(micro_batches) - 1
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            batch = to_device(fabric, batch)
            loss, _ = micro_batch_loss(model, batch, use_audio)
            fabric.backward(loss * scale)
        loss_sum += loss.detach().double()
    if fabric.world_size > 1:
        loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum")
    return (loss_sum / n_labels).item(), int(counts[1].item())


def to_device(fabric, batch):
    moved = dict(batch)
    for key in ("ids", "labels", "audio_features"):
        moved[key] = fabric.to_device(batch[key])
    return moved


def grads_finite(fabric, params) -> bool:
    """All gradients finite, on every process (FSDP: each holds a shard)."""
    total = torch.zeros((), dtype=torch.float32, device=fabric.device)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().float().pow(2).sum()
    if fabric.world_size > 1:
        total = fabric.all_reduce(total, reduce_op="sum")
    return bool(torch.isfinite(total))


def lr_factor(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Linear decay from lr (first update) to min_lr (last update), as a multiplier of lr (for LambdaLR)."""
    frac = min(step, total_steps - 1) / max(total_steps - 1, 1)
    return (lr - (lr - min_lr) * frac) / lr


# -----------------------------------------------------------------------------------------------------
# Data order: one permutation per epoch, from the seed and the epoch alone
# -----------------------------------------------------------------------------------------------------


def epoch_order(n: int, seed: int, epoch: int) -> list:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_micro_batches(dataset, order, step_in_epoch, batch_size, micro_batch_size, rank, world_size,
                       mask_prompt=True):
    """This process's micro-batches for one optimizer step. The step takes the next batch_size examples of the
    epoch's order; process r takes the r-th contiguous slice, cut into micro-batches. The examples of a step do
    not depend on the number of processes, so a run can resume on another number of devices."""
    per_rank = batch_size // world_size
    start = step_in_epoch * batch_size + rank * per_rank
    idx = order[start: start + per_rank]
    # The step's gradient is the same in any grouping: the loss is a mean over every labelled token of the step.
    idx = by_length(dataset, idx)
    return [make_batch([dataset[i] for i in idx[j: j + micro_batch_size]], mask_prompt)
            for j in range(0, len(idx), micro_batch_size)]


def by_length(dataset, idx) -> list:
    """idx sorted by example length: micro-batches of similar lengths waste less compute on padding (and, with
    --trim-audio, on frames). The demo's dev split: 107k tokens computed instead of 128k in index order."""
    return sorted(idx, key=lambda i: len(dataset.entries[i]["ids"]) if hasattr(dataset, "entries") else 0)


# -----------------------------------------------------------------------------------------------------
# Evaluation: validation loss and dev WER
# -----------------------------------------------------------------------------------------------------


@contextmanager
def full_model(fabric, model):
    """The plain module with every parameter present on this process (FSDP gathers its shards), for forward
    passes that each process runs on its own (evaluation, decoding)."""
    from lightning_fabric.strategies import FSDPStrategy

    if isinstance(fabric.strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model._forward_module, writeback=False):
            yield model.module
    else:
        yield model.module if hasattr(model, "module") else model


def rng_fork(fabric):
    """Evaluation must not move the training RNG (the random-audio ablation draws noise), so that an
    evaluation at an interruption point leaves the run identical to an uninterrupted one."""
    devices = [fabric.device] if fabric.device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


@torch.no_grad()
def validate(fabric, model, dev, tokenizer, run):
    """(validation loss over the dev split, dev WER over its first run.dev_limit utterances or None).
    Each process takes every world_size-th example; sums are reduced over processes."""
    with rng_fork(fabric), full_model(fabric, model) as net:
        net.eval()
        try:
            loss_sum, labels = dev_loss(fabric, net, dev, run)
            errors, words = dev_word_errors(fabric, net, dev, tokenizer, run)
        finally:
            net.train()
    sums = torch.stack([loss_sum, labels, errors, words])
    if fabric.world_size > 1:
        sums = fabric.all_reduce(sums, reduce_op="sum")
    val_loss = (sums[0] / sums[1]).item() if sums[1] > 0 else float("nan")
    dev_wer = (sums[2] / sums[3]).item() if run.dev_limit > 0 and sums[3] > 0 else None
    return val_loss, dev_wer


def dev_loss(fabric, net, dev, run):
    """(sum of the per-token losses, labelled tokens) over this process's share of the dev split, always on the
    response tokens: the quantity that matters for correction, comparable across ablations."""
    loss_sum, labels = (torch.zeros((), dtype=torch.float64, device=fabric.device) for _ in range(2))
    mine = by_length(dev, range(fabric.global_rank, len(dev), fabric.world_size))
    for j in range(0, len(mine), run.micro_batch_size):
        batch = make_batch([dev[i] for i in mine[j: j + run.micro_batch_size]])
        with fabric.autocast():
            loss, n = micro_batch_loss(net, to_device(fabric, batch), use_audio=not run.no_whisper)
        loss_sum += loss.double()
        labels += n
    return loss_sum, labels


def dev_word_errors(fabric, net, dev, tokenizer, run):
    """(word errors, reference words) of the corrections of this process's share of the first run.dev_limit dev
    utterances (generate.correct: greedy, as at inference)."""
    refs, hyps = [], []
    for i in range(fabric.global_rank, min(run.dev_limit, len(dev)), fabric.world_size):
        item = dev[i]
        with fabric.autocast():
            hyps.append(generate.correct(net, tokenizer, item["meta"]["hypotheses"],
                                         fabric.to_device(item["audio_features"]),
                                         audio_frames=item["meta"].get("n_frames")))
        refs.append(item["meta"]["text"])
    errors, words = word_errors(refs, hyps) if refs else (0, 0)
    return (torch.tensor(x, dtype=torch.float64, device=fabric.device) for x in (errors, words))


# -----------------------------------------------------------------------------------------------------
# Checkpoints, log, plot
# -----------------------------------------------------------------------------------------------------


def portable(name_or_dir):
    """A checkpoint as recorded in an adapter file: None (the embedded default) and model names as they are,
    folders as absolute paths."""
    if name_or_dir is None or not Path(name_or_dir).exists():
        return name_or_dir
    return str(Path(name_or_dir).resolve())


def provenance(run) -> dict:
    """Where an adapter came from, for its file's metadata: the command line, the code's commit, the data folder
    and its summary (utterances, 1-best and oracle WER per split)."""
    import subprocess

    try:
        root = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    data_summary = {split: {k: v for k, v in s.items() if k != "skipped"} for split, s in summary(run.data).items()}
    return {"command": "python train.py " + " ".join(getattr(run, "argv", None) or sys.argv[1:]),
            "commit": commit, "data": str(Path(run.data).resolve()), "data_summary": json.dumps(data_summary)}


def write_adapter(fabric, model, path: Path, run, **extra):
    """The adapter tensors alone (wl_checkpoint.save_adapter: safetensors, atomic, with the adapter config and the
    LLM / Whisper it was trained on in the metadata, so that generate.py and evaluate.py can rebuild the model)."""
    with full_model(fabric, model) as net:
        if fabric.is_global_zero:
            # the n-best form of the training data: generate.py and evaluate.py must build prompts the same way
            extra = {"hypotheses": getattr(run, "hypotheses", None) or "logprob",
                     **getattr(run, "provenance", {}), **extra}
            save_adapter(net, path, llm=portable(run.llm), whisper=portable(run.whisper), extra=extra)
    fabric.barrier()


def rng_state(fabric) -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(fabric.device) if fabric.device.type == "cuda" else None,
        # plain lists, so that the checkpoint loads with torch.load(weights_only=True)
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_internal), py_gauss],
    }


def set_rng_state(fabric, state: dict):
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and fabric.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), fabric.device)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def all_rng_states(fabric) -> list:
    """Every process's RNG states (process 0 writes the checkpoint)."""
    mine = rng_state(fabric)
    if fabric.world_size == 1:
        return [mine]
    gathered = [None] * fabric.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


def save_state(fabric, path: Path, model, optimizer, scheduler, progress: dict, adapter_names: list):
    """Everything --resume needs, written atomically: only the adapter tensors of the model (the frozen LLM is
    rebuilt from its checkpoint), the optimizer and scheduler, progress (step, epoch, data order, best, log)
    and the RNG states of every process."""
    from lightning_fabric.strategies import DeepSpeedStrategy

    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": progress,
             "rng": all_rng_states(fabric), "adapter_names": adapter_names}
    tmp = path.with_name(f".{path.name}.tmp")
    # DeepSpeed writes a folder of shards and leaves out the frozen parameters itself (no filter there)
    deepspeed = isinstance(fabric.strategy, DeepSpeedStrategy)
    fabric.save(tmp, state, filter=None if deepspeed else {"model": lambda name, _: is_adapter_param(name)})
    if fabric.is_global_zero:
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    fabric.barrier()


def load_state(fabric, path: Path, model, optimizer, scheduler, adapter_names: list) -> dict:
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "progress": None, "rng": None,
             "adapter_names": None}
    try:
        fabric.load(path, state, strict=False)
    except (RuntimeError, KeyError, ValueError) as e:
        raise TrainError(f"{path} cannot be resumed: {first_line(e)}") from None
    if state["adapter_names"] != adapter_names:
        raise TrainError(f"{path} does not match the model (its adapter tensors differ): "
                         "check --variant, --start-layer and the LLM")
    rngs = state["rng"]
    set_rng_state(fabric, rngs[fabric.global_rank] if len(rngs) == fabric.world_size else rngs[0])
    return state["progress"]


LOG_FIELDS = ("step", "epoch", "loss", "lr", "tokens_per_s", "val_loss", "dev_wer")


def write_log(path: Path, rows: list):
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in LOG_FIELDS})
    write_atomic(path, text.getvalue())


def plot_curves(path: Path, rows: list):
    """Training and validation loss, dev WER and learning rate against the optimizer step."""
    try:
        import matplotlib
    except ImportError:
        return  # the plot is a convenience; the CSV has the same numbers
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("val_loss") is not None]
    wers = [r for r in evals if r.get("dev_wer") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
    axes[0].plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="dev")
    axes[0].set(title="loss (response tokens)", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in wers], [100 * r["dev_wer"] for r in wers], "o-", color="C2")
    axes[1].set(title="dev WER (%)", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train], color="C3")
    axes[2].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(path, buf.getvalue())


# -----------------------------------------------------------------------------------------------------
# Setup: precision, Fabric, data, model
# -----------------------------------------------------------------------------------------------------


def on_gpu(accelerator: str) -> bool:
    if accelerator in ("cuda", "gpu"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


# --precision → Fabric's precision plugin. "bf16" is ours: the frozen weights are stored in bf16 (half the memory,
# as bf16-true), the trained adapter tensors stay fp32 and the matmuls run under bf16 autocast. Pure bf16-true
# would lose the updates themselves: near 1.0 bf16 has a spacing of 2^-8..2^-7, so an AdamW step of lr = 1e-3
# leaves the identity-initialised diagonals, the norm scales and gate_W exactly where they started.
FABRIC_PRECISION = {"bf16": "bf16-mixed", "bf16-true": "bf16-true", "bf16-mixed": "bf16-mixed",
                    "16-mixed": "16-mixed", "32-true": "32-true"}


def resolve_precision(requested, accelerator) -> str:
    """The precision mode (a key of FABRIC_PRECISION). The default is the fastest correct choice for the device:
    bf16 on a GPU that has it, 16-mixed on other GPUs; on a CPU bf16 where bf16 matmuls are faster than fp32
    (AVX512-BF16, AMX), else fp32."""
    gpu = on_gpu(accelerator)
    bf16_gpu = gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if requested is None:
        return "bf16" if bf16_gpu else "16-mixed" if gpu else "bf16" if cpu_bf16_is_faster() else "32-true"
    if requested.startswith("bf16") and gpu and not bf16_gpu:
        raise TrainError("this GPU does not support bf16: use --precision 16-mixed or 32")
    if requested == "16-mixed" and not gpu:
        raise TrainError("16-mixed (fp16 autocast) needs a GPU: on CPU use --precision bf16 or 32")
    return {"32": "32-true"}.get(requested, requested)


def make_fabric(run, precision: str):
    from lightning_fabric import Fabric

    strategy = run.strategy
    try:
        if strategy == "fsdp":
            from lightning_fabric.strategies import FSDPStrategy

            # Each LLaMA block is one FSDP unit. use_orig_params keeps the frozen and the trainable parameters of
            # a block apart, so the optimizer (built from the trainable ones only) holds no state for the LLM.
            strategy = FSDPStrategy(auto_wrap_policy={Block, AdapterBlock}, use_orig_params=True,
                                    state_dict_type="full", sharding_strategy="FULL_SHARD")
        elif strategy == "deepspeed":
            from lightning_fabric.strategies import DeepSpeedStrategy

            strategy = DeepSpeedStrategy(stage=2, exclude_frozen_parameters=True)  # no LLM weights in checkpoints
        return Fabric(accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=strategy,
                      precision=FABRIC_PRECISION[precision])
    except (ValueError, RuntimeError, ImportError, ModuleNotFoundError) as e:
        raise TrainError(f"cannot set up {run.strategy} on {run.accelerator}: {first_line(e)}") from None


def load_feature_whisper(name_or_dir):
    """The Whisper model (its weights only) from a checkpoint folder or a model name."""
    try:
        return Whisper.from_checkpoint(ensure_whisper(name_or_dir))
    except (OSError, ValueError) as e:
        raise TrainError(f"cannot load the Whisper model {name_or_dir}: {first_line(e)}") from None


def same_path(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return Path(a).resolve() == Path(b).resolve()


def check_data_folder(run):
    if not (Path(run.data) / "train" / "index.jsonl").is_file():
        raise TrainError(f"no prepared data in {run.data}: run `python prepare_data.py` first"
                         + (" (or pass --data)" if run.data == Run.data else ""))


def load_data(run, tokenizer, meta: dict):
    """(train, dev or None) from the prepared folder (meta: its meta.json). Prompts are re-tokenised when the
    folder was prepared for another LLM than the one trained here."""
    check_data_folder(run)
    root = Path(run.data)
    # None is the embedded default LLM, in the prepared folder's meta.json as on our command line
    retokenize = None if same_path(meta.get("llm") or SMOLLM2_DIR, run.llm or SMOLLM2_DIR) else tokenizer
    try:
        train = PreparedDataset(root, "train", tokenizer=retokenize)
        dev = PreparedDataset(root, "dev", tokenizer=retokenize) if (root / "dev" / "index.jsonl").is_file() else None
    except ValueError as e:
        raise TrainError(str(e)) from None
    if len(train) == 0:
        raise TrainError(f"{root}/train holds no utterances")
    if dev is not None and len(dev) == 0:
        dev = None
    return train, dev


def check_lengths(datasets, block_size):
    for ds in datasets:
        if ds is None or ds.tokenizer is not None:
            continue
        longest = max(len(e["ids"]) for e in ds.entries)
        if longest > block_size:
            raise TrainError(f"{ds.root}/{ds.split} has a prompt of {longest} tokens; the LLM's context is "
                             f"{block_size}")


def build(run, fabric, precision, feature_width):
    """The WhisperingLLaMA with its adapters initialised (or loaded from --adapter)."""
    try:
        llm_dir = ensure_llm(run.llm)
    except ProjectError as e:
        raise TrainError(first_line(e)) from None
    whisper_model = None
    if not run.no_whisper:
        whisper_model = load_feature_whisper(run.whisper)
        if feature_width is not None and whisper_model.dims.n_audio_state != feature_width:
            raise TrainError(f"the audio features in {run.data} are {feature_width} wide but --whisper {run.whisper} "
                             f"is {whisper_model.dims.n_audio_state} wide: pass the model the data was prepared with")
    from lightning_fabric.strategies import FSDPStrategy

    device = "cpu" if isinstance(fabric.strategy, FSDPStrategy) else fabric.device  # FSDP moves its own shards
    try:
        model = build_model(llm_dir, whisper_model, device=device, **adapter_settings(run))
        if run.adapter:
            load_adapter_file(model, run.adapter)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(first_line(e)) from None
    if precision == "bf16" and run.strategy not in ("fsdp", "deepspeed"):
        # The frozen weights in bf16, the adapters in fp32. (FSDP flattens each block into one buffer of one dtype
        # and keeps it fp32 but sharded; DeepSpeed keeps fp32 master weights itself.)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(torch.float32 if p.requires_grad else torch.bfloat16)
    elif precision != "bf16-true":  # (bf16-true: Fabric casts everything)
        model = model.float()  # fp32 weights for 32-true and the mixed precisions (the LLM file may be bf16)
    return model, llm_dir


def default_out(run) -> str:
    name = f"wl-{run.variant.lower()}"
    for ablation in ("no_whisper", "random_audio", "random_init", "no_mask"):
        if getattr(run, ablation):
            name += "-" + ablation.replace("_", "-")
    if run.kv_layout == "paper":
        name += "-paper"
    if run.prompt_length != Run.prompt_length:
        name += f"-p{run.prompt_length}"
    return str(ROOT / "out" / name)


@dataclass
class Session:
    """What one training session works with (built by `setup`)."""
    run: Run
    fabric: object
    precision: str
    tokenizer: object = None
    train_set: object = None
    dev_set: object = None
    model: object = None
    llm_dir: Optional[Path] = None
    optimizer: object = None
    scheduler: object = None
    progress: dict = None
    adapter_names: list = None
    steps_per_epoch: int = 0
    total_steps: int = 0

    @property
    def out_dir(self) -> Path:
        return self.run.out


def launch(run: Run) -> Session:
    """The precision, Fabric and its processes, threads and seed."""
    precision = resolve_precision(run.precision, run.accelerator)
    fabric = make_fabric(run, precision)
    fabric.launch()
    if run.threads:
        torch.set_num_threads(run.threads)
    fabric.seed_everything(run.seed)  # the adapters' initial values (the prefix table is random)
    if run.batch_size % (run.micro_batch_size * fabric.world_size):
        raise TrainError(f"--batch {run.batch_size} must be a multiple of --micro-batch {run.micro_batch_size} × "
                         f"{fabric.world_size} processes")
    return Session(run, fabric, precision)


def load_inputs(s: Session):
    """The tokenizer, the train and dev splits and the model, with what the data folder says about them."""
    run, fabric = s.run, s.fabric
    meta = json.loads((Path(run.data) / "meta.json").read_text()) if (Path(run.data) / "meta.json").is_file() else {}
    run.hypotheses = meta.get("hypotheses") or "logprob"  # recorded in every adapter file of this run
    run.provenance = provenance(run)
    if run.whisper is None:
        run.whisper = meta.get("feature_model") or "tiny.en"
    elif meta.get("feature_model") and not same_path(meta["feature_model"], run.whisper):
        fabric.print(f"note: the audio features in {run.data} come from Whisper {meta['feature_model']}, but AiW "
                     f"copies the cross-attention of {run.whisper}")
    with fabric.rank_zero_first():  # the first use converts the embedded checkpoints: once, not by every process
        try:
            s.tokenizer = Tokenizer.from_dir(ensure_llm(run.llm))
        except ProjectError as e:
            raise TrainError(first_line(e)) from None
        s.train_set, s.dev_set = load_data(run, s.tokenizer, meta)
        if len(s.train_set) < run.batch_size:
            raise TrainError(f"{run.data}/train has {len(s.train_set)} utterances, fewer than one batch "
                             f"({run.batch_size}): lower --batch")
        s.model, s.llm_dir = build(run, fabric, s.precision, s.train_set[0]["audio_features"].shape[-1])
    s.steps_per_epoch = len(s.train_set) // run.batch_size
    s.total_steps = run.epochs * s.steps_per_epoch


def prepare_out_dir(s: Session):
    """Created once the inputs have loaded (a failed start leaves nothing behind); a new run clears an old one's."""
    if s.fabric.is_global_zero:
        s.out_dir.mkdir(parents=True, exist_ok=True)
        if not s.run.resume:
            for name in ("state.ckpt", "last.safetensors", "best.safetensors", "log.csv", "curves.png"):
                if (s.out_dir / name).is_dir():  # DeepSpeed's state is a folder
                    shutil.rmtree(s.out_dir / name)
                else:
                    (s.out_dir / name).unlink(missing_ok=True)
    s.fabric.barrier()


def setup_optimizer(s: Session):
    """AdamW over the adapter tensors and the linear decay, set up with the model for the strategy."""
    run, fabric = s.run, s.fabric

    def make_optimizer(params):
        return torch.optim.AdamW(params, lr=run.learning_rate, weight_decay=run.weight_decay)

    if run.strategy == "deepspeed":  # DeepSpeed wants the model and its optimizer together
        s.model, s.optimizer = fabric.setup(s.model, make_optimizer([p for p in s.model.parameters()
                                                                       if p.requires_grad]))
    else:  # FSDP needs the wrapped module's parameters in the optimizer: set up the model first
        s.model = fabric.setup_module(s.model)
        s.optimizer = fabric.setup_optimizers(make_optimizer([p for p in s.model.parameters() if p.requires_grad]))
    s.scheduler = torch.optim.lr_scheduler.LambdaLR(
        s.optimizer, lambda step: lr_factor(step, s.total_steps, run.learning_rate, run.min_lr))


def setup(run: Run) -> Optional[Session]:
    """Fabric, the inputs (tokenizer, data, model), the output folder, the optimizer and the progress (fresh, or
    from state.ckpt with --resume); writes config.json. None when the run being resumed has already finished."""
    s = launch(run)
    load_inputs(s)
    check_lengths([s.train_set, s.dev_set], s.model.config.block_size)
    s.adapter_names = sorted(n for n, _ in s.model.named_parameters() if is_adapter_param(n))
    model_config = s.model.config.to_dict()
    n_train = sum(p.numel() for p in s.model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in s.model.parameters())
    prepare_out_dir(s)
    setup_optimizer(s)
    s.progress = {"step": 0, "order": [], "order_epoch": -1, "best": None, "best_step": None, "best_metric": None,
                  "bad_evals": 0, "stopped": None, "saved_step": None, "log": []}
    fabric = s.fabric
    if run.resume:
        s.progress = load_state(fabric, s.out_dir / "state.ckpt", s.model, s.optimizer, s.scheduler, s.adapter_names)
        fabric.print(f"resuming {s.out_dir} at step {s.progress['step']} of {s.total_steps}")
        if s.progress["stopped"] or s.progress["step"] >= s.total_steps:
            fabric.print(f"this run has finished ({s.progress['stopped'] or 'all epochs done'}); nothing to do")
            return None
    accumulation = run.batch_size // (run.micro_batch_size * fabric.world_size)
    config = {"run": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(run).items()},
              "model": model_config, "llm_dir": str(s.llm_dir), "precision": s.precision,
              "world_size": fabric.world_size, "accumulation_steps": accumulation,
              "train_utterances": len(s.train_set), "dev_utterances": len(s.dev_set) if s.dev_set else 0,
              "steps_per_epoch": s.steps_per_epoch, "total_steps": s.total_steps, "trainable_parameters": n_train}
    if fabric.is_global_zero:
        write_atomic(s.out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    fabric.print(f"WL-{run.variant}: {n_train / 1e6:.3f}M trainable of {n_all / 1e6:.1f}M parameters; "
                 f"{len(s.train_set)} train / {config['dev_utterances']} dev utterances, {s.steps_per_epoch} steps "
                 f"per epoch, batch {run.batch_size} = {run.micro_batch_size} × {accumulation} accumulation × "
                 f"{fabric.world_size} processes; precision {s.precision}; output {s.out_dir}")
    if s.dev_set is None:
        fabric.print(f"note: {run.data} has no dev split: no evaluation, no best checkpoint, no early stopping")
    return s


# -----------------------------------------------------------------------------------------------------
# The training loop
# -----------------------------------------------------------------------------------------------------


def fit(s: Session):
    """The loop: optimizer steps until the step budget, the end of the schedule or early stopping, evaluating and
    checkpointing at each epoch's end (and every --eval-every steps). Returns (tokens, seconds) of training."""
    from tqdm import tqdm

    run, fabric, progress = s.run, s.fabric, s.progress
    stop_at = s.total_steps if run.max_steps is None else min(s.total_steps, run.max_steps)
    bar = tqdm(total=stop_at, initial=progress["step"], desc="training", unit="step",
               disable=not fabric.is_global_zero, dynamic_ncols=True)
    train_time, tokens_seen = 0.0, 0  # training steps only: evaluation and checkpoints are not throughput
    try:
        while progress["step"] < stop_at and not progress["stopped"]:
            loss, n_tokens, dt = train_step(s)
            train_time, tokens_seen = train_time + dt, tokens_seen + n_tokens
            step = progress["step"]
            bar.set_postfix(epoch=progress["log"][-1]["epoch"], loss=f"{loss:.4f}", tok_s=f"{n_tokens / dt:.0f}")
            bar.update(1)
            if step % s.steps_per_epoch == 0 or (run.eval_every and step % run.eval_every == 0):
                evaluate_and_checkpoint(s, bar)
            elif step == stop_at:
                checkpoint(s)
            if fabric.is_global_zero and (step % 10 == 0 or step == stop_at):
                publish_log(s)
    except Diverged as e:
        publish_log(s)
        last = s.out_dir / "last.safetensors"
        kept = f"the last good checkpoint is {last} (step {progress['saved_step']})" if last.exists() else \
            "no checkpoint was written before it"
        raise TrainError(f"{e}; stopped, {kept}. Try a lower --lr.") from None
    finally:
        bar.close()
    publish_log(s, plot=True)
    return tokens_seen, train_time


def train_step(s: Session):
    """One optimizer step over the next effective batch of the epoch's order. Returns (loss, tokens, seconds)."""
    run, fabric, progress = s.run, s.fabric, s.progress
    step = progress["step"]
    epoch, in_epoch = divmod(step, s.steps_per_epoch)
    if progress["order_epoch"] != epoch:
        progress["order"], progress["order_epoch"] = epoch_order(len(s.train_set), run.seed, epoch), epoch
    t0 = time.perf_counter()
    micro_batches = step_micro_batches(s.train_set, progress["order"], in_epoch, run.batch_size, run.micro_batch_size,
                                       fabric.global_rank, fabric.world_size, mask_prompt=not run.no_mask)
    lr = s.optimizer.param_groups[0]["lr"]
    loss, n_tokens = accumulate_gradients(fabric, s.model, micro_batches, use_audio=not run.no_whisper)
    if not math.isfinite(loss) or not grads_finite(fabric, [p for p in s.model.parameters() if p.requires_grad]):
        raise Diverged(f"the loss is {loss} at step {step + 1} (epoch {epoch + 1})")
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    s.scheduler.step()
    dt = time.perf_counter() - t0
    progress["step"] = step + 1
    progress["log"].append({"step": step + 1, "epoch": epoch + 1, "loss": loss, "lr": lr,
                            "tokens_per_s": round(n_tokens / dt, 1)})
    return loss, n_tokens, dt


def evaluate_and_checkpoint(s: Session, bar):
    """Validation (when there is a dev split), best.safetensors when the dev score improved, early stopping,
    then the checkpoint, the log and the plot."""
    run, progress, step = s.run, s.progress, s.progress["step"]
    epoch = progress["log"][-1]["epoch"]
    if s.dev_set is not None:
        val_loss, dev_wer = validate(s.fabric, s.model, s.dev_set, s.tokenizer, run)
        progress["log"].append({"step": step, "epoch": epoch, "val_loss": val_loss, "dev_wer": dev_wer})
        score = dev_wer if dev_wer is not None else val_loss
        shown = f"val loss {val_loss:.4f}" + ("" if dev_wer is None else f", dev WER {100 * dev_wer:.2f}%")
        if progress["best"] is None or score < progress["best"]:
            progress["best"], progress["best_step"], progress["bad_evals"] = score, step, 0
            progress["best_metric"] = "val loss" if dev_wer is None else "dev WER"
            write_adapter(s.fabric, s.model, s.out_dir / "best.safetensors", run, step=step, val_loss=val_loss,
                          dev_wer=dev_wer)
            shown += " (best)"
        else:
            progress["bad_evals"] += 1
        if s.fabric.is_global_zero:
            bar.write(f"step {step} (epoch {epoch}): {shown}")
        if progress["bad_evals"] >= run.patience:
            progress["stopped"] = f"early stopping: no better dev score in {run.patience} evaluations"
    checkpoint(s)
    publish_log(s, plot=True)


def checkpoint(s: Session):
    """last.safetensors and state.ckpt (everything --resume needs)."""
    s.progress["saved_step"] = s.progress["step"]
    write_adapter(s.fabric, s.model, s.out_dir / "last.safetensors", s.run, step=s.progress["step"])
    save_state(s.fabric, s.out_dir / "state.ckpt", s.model, s.optimizer, s.scheduler, s.progress, s.adapter_names)


def publish_log(s: Session, plot=False):
    if s.fabric.is_global_zero:
        write_log(s.out_dir / "log.csv", s.progress["log"])
        if plot:
            plot_curves(s.out_dir / "curves.png", s.progress["log"])


def train(run: Run):
    s = setup(run)
    if s is None:
        return
    start_step = s.progress["step"]
    tokens, elapsed = fit(s)
    report(s, start_step, tokens, elapsed)


def report(s: Session, start_step: int, tokens: int, elapsed: float):
    progress, fabric = s.progress, s.fabric
    steps = progress["step"] - start_step
    if steps:
        fabric.print(f"trained {steps} steps ({tokens} tokens) in {elapsed:.1f} s of training steps: "
                     f"{tokens / elapsed:.1f} tokens/s")
    if progress["stopped"]:
        fabric.print(f"{progress['stopped']} (best at step {progress['best_step']})")
    elif progress["step"] < s.total_steps:
        fabric.print(f"stopped at step {progress['step']} of {s.total_steps}; continue with --resume --out "
                     f"{s.out_dir}")
    if progress["best_step"] is not None:
        best = progress["best"]
        score = f"dev WER {100 * best:.2f}%" if progress["best_metric"] == "dev WER" else f"val loss {best:.4f}"
        fabric.print(f"best {score} at step {progress['best_step']}: {s.out_dir / 'best.safetensors'}")


# -----------------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line, from Run's fields. Only the flags given end up in the namespace (Run supplies the
    defaults), so that --resume can tell which settings were asked for."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=argparse.SUPPRESS)
    groups = {}
    for name, f in FLAGS.items():
        m = f.metadata
        group = groups.get(m["group"]) or groups.setdefault(m["group"], p.add_argument_group(m["group"]))
        if isinstance(f.default, bool):
            group.add_argument(flag(name), dest=name, action="store_true", help=m["help"])
        else:
            kwargs = {"type": type(f.default) if f.default is not None else str, **m["argparse"]}
            group.add_argument(flag(name), dest=name, help=m["help"], **kwargs)
    return p


def check_run(run):
    for name in ("batch_size", "micro_batch_size", "epochs", "devices", "num_nodes", "prompt_length", "patience"):
        if getattr(run, name) < 1:
            raise TrainError(f"{flag(name)} must be at least 1")
    if run.max_steps is not None and run.max_steps < 1:
        raise TrainError("--max-steps must be at least 1")
    if run.threads is not None and run.threads < 1:
        raise TrainError("--threads must be at least 1")
    if run.dev_limit < 0 or run.eval_every < 0 or run.start_layer < 0:
        raise TrainError("--dev-limit, --eval-every and --start-layer cannot be negative")
    if run.learning_rate <= 0 or run.min_lr < 0 or run.min_lr > run.learning_rate:
        raise TrainError("need 0 <= --min-lr <= --lr and --lr > 0")


def resolve_run(argv) -> Run:
    """The settings of this session: the command line, or for --resume the saved run's recipe plus the flags
    that may change between sessions."""
    given = vars(build_parser().parse_args(argv))
    run = Run(**given, argv=list(argv) if argv is not None else sys.argv[1:])
    run.out = Path(run.out or default_out(run))
    if not run.resume and (run.out / "state.ckpt").exists() and not run.overwrite:
        raise TrainError(f"{run.out} already holds a run: pass --resume to continue it, --overwrite to replace it "
                         "or --out for a new folder")
    if run.resume:
        resume_recipe(run, given)
    check_run(run)
    check_data_folder(run)  # the most common mistake; costs nothing to find
    return run


def resume_recipe(run: Run, given: dict):
    """Take the recipe from the run being resumed (its config.json); a flag given now must agree with it."""
    config_path = run.out / "config.json"
    if not config_path.is_file() or not (run.out / "state.ckpt").exists():
        raise TrainError(f"nothing to resume in {run.out} (no config.json + state.ckpt)")
    saved = json.loads(config_path.read_text())["run"]
    for key in RECIPE:
        paths = key in ("data", "llm", "whisper", "adapter")
        if key in given and given[key] != saved.get(key) and not (paths and same_path(given[key], saved.get(key))):
            raise TrainError(f"{flag(key)} {given[key]} differs from the run being resumed ({saved.get(key)})")
        setattr(run, key, saved.get(key))


def main(argv=None):
    run = None
    try:
        run = resolve_run(argv)
        train(run)
    except ProjectError as e:  # TrainError; InputError: a damaged prepared folder, found while reading it
        print(f"error: {first_line(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # every checkpoint file is written to a temp file and renamed: none is half-written
        resume = f": python train.py --out {run.out} --resume continues from its last checkpoint" \
            if run is not None and (Path(run.out) / "state.ckpt").exists() else ""
        print(f"interrupted{resume}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
