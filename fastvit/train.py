"""Pre-training and fine-tuning with the ViT paper's recipes, on one process or many (torchrun), DDP or FSDP2.

    python -m fastvit.train                      # digits preset: a tiny ViT, ~99% held-out top-1 in < 3 min on CPU
    torchrun --nproc_per_node 8 -m fastvit.train --data /data/imagenet --model vit_base_patch16_224 --fsdp
    python -m fastvit.train --recipe finetune --init runs/pre --data /data/imagenet --img-size 384

Recipes (flags always win; with ``--data digits`` a small-data preset replaces the paper's batch/lr/warmup):
- pretrain: AdamW (0.9, 0.999), decoupled weight decay on weight matrices only, linear warmup then linear (or cosine)
  decay, grad-norm clip 1.0, dropout 0.1, global batch 4096 with the lr given at that batch (3e-3, wd 0.3: the
  paper's ImageNet setting; with another --global-batch and no --lr the lr is scaled linearly).
- finetune: SGD momentum 0.9, batch 512, no weight decay, 500 warmup steps, cosine decay, from ``--init`` (a
  pretrain checkpoint) with a zero-initialised head (``reset_classifier``) and ``set_input_size`` to ``--img-size``.

Global batch = ranks x micro-batch x accumulation steps; each micro-batch loss is scaled so the gradient is the mean
over the global batch, and augmentation randomness is keyed by (seed, step, sample position) (``fastvit.data``), so
how the batch is split does not change the result. Checkpoints: ``fastvit.checkpoint``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

import fastvit
from fastvit import checkpoint
from fastvit.data import GlobalSampler, eval_batches, make_source, micro_batch_plan, mix_seed, progress
from fastvit.flops import peak_flops, train_flops_per_image

RECIPES = ("pretrain", "finetune")
SCHEDULES = ("linear", "cosine")

# The paper's settings (ImageNet, Table 3 / Appendix B.1.1); the lr is the lr at the given global batch.
RECIPE_DEFAULTS = {
    "pretrain": dict(model="vit_base_patch16_224", img_size=224, global_batch=4096, lr=3e-3, weight_decay=0.3,
                     warmup_steps=10_000, schedule="linear", dropout=0.1, epochs=300, eval_every=1000,
                     save_every=1000, threads=0),
    "finetune": dict(model="vit_base_patch16_224", img_size=384, global_batch=512, lr=0.01, weight_decay=0.0,
                     warmup_steps=500, schedule="cosine", dropout=0.0, steps=20_000, eval_every=1000,
                     save_every=1000, threads=0),
}
# Small-data preset for --data digits (1437 training images of 8x8): a 4-block ViT of width 64 on 16x16 inputs.
DIGITS_PRESET = {
    "pretrain": dict(model="vit_tiny_patch16_224", patch_size=4, embed_dim=64, depth=4, num_heads=4, img_size=16,
                     global_batch=128, lr=2e-3, weight_decay=0.05, warmup_steps=30, dropout=0.0, steps=500,
                     eval_every=100, save_every=250, threads=1),
    "finetune": dict(img_size=32, global_batch=128, lr=0.01, warmup_steps=20, steps=100, eval_every=50,
                     save_every=100, threads=1),
}
ARCH_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads")
MAX_DEFAULT_MICRO = 128


def _opt(help, **kw):
    return field(default=kw.pop("default", None), metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    """Every option of a run; ``python -m fastvit.train --help`` lists them as flags (``--global-batch`` for
    ``global_batch``). None means: the recipe's default, or the digits preset's with ``--data digits``."""
    model: str | None = _opt("registered model name (fastvit.list_models())")
    data: str = _opt("'digits' (scikit-learn's bundled 8x8 digits) or an ImageFolder root with train/ and val/",
                     default="digits")
    recipe: str = _opt("pretrain (AdamW) or finetune (SGD from --init)", default="pretrain", choices=RECIPES)
    init: str | None = _opt("finetune from this checkpoint: a step folder, a run's --out folder (its latest "
                            "checkpoint) or a timm/torchvision/HF/.npz weights file")
    img_size: int | None = _opt("input resolution (finetune: the model is resampled to it)", type=int)
    patch_size: int | None = _opt("override the model's patch size", type=int)
    embed_dim: int | None = _opt("override the model's width", type=int)
    depth: int | None = _opt("override the model's number of blocks", type=int)
    num_heads: int | None = _opt("override the model's number of heads", type=int)
    global_batch: int | None = _opt("images per optimizer step over all ranks", type=int)
    micro_batch: int | None = _opt("images per rank per forward (global = ranks x micro x accumulation; default: "
                                   f"the largest divisor of global/ranks up to {MAX_DEFAULT_MICRO})", type=int)
    steps: int | None = _opt("optimizer steps (or --epochs)", type=int)
    epochs: float | None = _opt("passes over the training set (or --steps)", type=float)
    lr: float | None = _opt("peak learning rate at --global-batch (the table's lr is given at the table's batch and "
                            "scaled linearly to the --global-batch you pass)", type=float)
    weight_decay: float | None = _opt("decoupled weight decay on weight matrices (pretrain)", type=float)
    warmup_steps: int | None = _opt("linear warmup steps", type=int)
    schedule: str | None = _opt("decay after warmup", choices=SCHEDULES)
    clip_grad: float = _opt("clip the global gradient norm to this (0: off)", default=1.0, type=float)
    dropout: float | None = _opt("dropout after dense layers and position embedding", type=float)
    drop_path: float = _opt("stochastic depth rate", default=0.0, type=float)
    label_smoothing: float = _opt("cross-entropy label smoothing", default=0.0, type=float)
    seed: int = _opt("seed of the model init, data order and augmentation", default=0, type=int)
    seeds: int = _opt("repeat the run with seeds seed..seed+N-1 and report top-1 mean ± std", default=1, type=int)
    out: str | None = _opt("run folder: checkpoints, metrics.jsonl, curves.png (default runs/<data>-<recipe>-<time>)")
    resume: str = _opt("'auto' (latest complete checkpoint in --out, if any), 'none', or a checkpoint folder",
                       default="auto")
    keep: int = _opt("keep the last K checkpoints (0: all)", default=3, type=int)
    save_every: int | None = _opt("checkpoint every N steps (and at the end)", type=int)
    eval_every: int | None = _opt("held-out top-1 every N steps (and at the end)", type=int)
    backend: str = _opt("kernels: auto (Triton on GPU), torch or triton", default="auto", choices=fastvit.ops.BACKENDS)
    fsdp: bool = _opt("shard with FSDP2 (fully_shard per block, then the root) instead of DDP", default=False,
                      action="store_true")
    dist_backend: str = _opt("process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl", default="auto",
                             choices=("auto", "gloo", "nccl"))
    device: str = _opt("auto (cuda:<local rank> if available, else cpu), cpu or cuda", default="auto",
                       choices=("auto", "cpu", "cuda"))
    workers: int = _opt("data-loading worker processes per rank (ImageFolder)", default=4, type=int)
    threads: int | None = _opt("CPU threads per rank (0: OMP_NUM_THREADS if set, else cores / local ranks); the "
                               "digits preset uses 1: threads only add overhead on its tiny tensors", type=int)
    fewshot: bool = _opt("after training, few-shot linear evaluation (1/5/10/25 shots, 3 seeds)", default=False,
                         action="store_true")
    peak_tflops: float | None = _opt("peak TFLOP/s per device for MFU (default: from the GPU name)", type=float)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        if action.default is not None:
            return super()._get_help_string(action)
        tabled = {k for table in (*RECIPE_DEFAULTS.values(), *DIGITS_PRESET.values()) for k in table}
        return action.help + (" (default: from the recipe or the digits preset)" if action.dest in tabled else "")


def _table(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


def build_parser() -> argparse.ArgumentParser:
    epilog = "\n".join(["recipe defaults (explicit flags win; a default lr is scaled linearly to the "
                        "--global-batch you pass):"]
                       + [f"  {name}: {_table(values)}" for name, values in RECIPE_DEFAULTS.items()]
                       + ["digits preset (--data digits, replaces the recipe's values it names):"]
                       + [f"  {name}: {_table(values)}" for name, values in DIGITS_PRESET.items()])
    parser = argparse.ArgumentParser(prog="python -m fastvit.train", description=__doc__.split("\n\n")[0],
                                     epilog=epilog, formatter_class=_HelpFormatter)
    length = parser.add_mutually_exclusive_group()
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        target = length if f.name in ("steps", "epochs") else parser
        target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **meta)
    return parser


def resolve(cfg: TrainConfig, world: int) -> tuple[TrainConfig, dict]:
    """Fill the options left None from the digits preset (``--data digits``) and then the recipe; returns the
    resolved config and {option: 'preset' | 'recipe'} for the filled ones. ``check`` validates the result (an
    unknown --recipe fills nothing) and ``steps_for`` turns epochs into steps."""
    preset = DIGITS_PRESET.get(cfg.recipe, {}) if cfg.data == "digits" else {}
    values, filled = {}, {}
    length_given = cfg.steps is not None or cfg.epochs is not None
    for source, table in (("preset", preset), ("recipe", RECIPE_DEFAULTS.get(cfg.recipe, {}))):
        for name, value in table.items():
            if name in ("steps", "epochs") and (length_given or "steps" in values or "epochs" in values):
                continue
            if name == "model" and cfg.init and cfg.recipe == "finetune":
                continue  # the architecture comes from the checkpoint
            if getattr(cfg, name) is None and name not in values:
                values[name], filled[name] = value, source
    if filled.get("lr") and "global_batch" not in filled and cfg.global_batch:
        # the table's lr is given at the table's batch: scale it linearly to the --global-batch passed
        table = preset if filled["lr"] == "preset" else RECIPE_DEFAULTS[cfg.recipe]
        values["lr"] = table["lr"] * cfg.global_batch / table["global_batch"]
    cfg = dataclasses.replace(cfg, **values)
    if cfg.micro_batch is None and isinstance(cfg.global_batch, int) and cfg.global_batch > 0 \
            and cfg.global_batch % world == 0:
        per_rank = cfg.global_batch // world
        micro = max(d for d in range(1, min(per_rank, MAX_DEFAULT_MICRO) + 1) if per_rank % d == 0)
        cfg = dataclasses.replace(cfg, micro_batch=micro)
    return cfg, filled


def steps_for(cfg: TrainConfig, num_train: int) -> TrainConfig:
    """Turn --epochs into --steps (global batches of the stream, the last one rounded up) in a checked config."""
    if cfg.steps is not None:
        return cfg
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * num_train / cfg.global_batch)))


def _need(ok, msg):
    if not ok:
        raise ValueError(msg)


def _check_init(init):
    _need(init is None or os.path.exists(init), f"--init {init!r} does not exist")


def check(cfg: TrainConfig, world: int) -> None:
    """Validate a ``resolve``d config before any data or model is built (the one place flags are checked): raise
    ValueError naming the flag, the expected value and the one received."""
    _need(cfg.recipe in RECIPES, f"--recipe must be one of {RECIPES}, got {cfg.recipe!r}")
    _need(cfg.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    _need(cfg.steps is None or cfg.epochs is None,
          f"pass --steps or --epochs, not both (got --steps {cfg.steps} and --epochs {cfg.epochs})")
    if cfg.steps is None:
        _need(isinstance(cfg.epochs, (int, float)) and cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs!r}")
    _need(cfg.micro_batch is not None or not isinstance(cfg.global_batch, int) or cfg.global_batch % world == 0,
          f"--global-batch must be a multiple of the number of ranks ({world}), got {cfg.global_batch}")
    for name in ("global_batch", "micro_batch", "img_size", "seeds") + (("steps",) if cfg.steps is not None else ()):
        value = getattr(cfg, name)
        _need(isinstance(value, int) and value >= 1,
              f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in ("warmup_steps", "keep", "workers", "threads"):
        _need(getattr(cfg, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    for name in ("save_every", "eval_every"):
        _need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    _need(cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _need(cfg.weight_decay >= 0 and cfg.clip_grad >= 0,
          f"--weight-decay and --clip-grad must be >= 0, got {cfg.weight_decay} and {cfg.clip_grad}")
    for name in ("dropout", "drop_path", "label_smoothing"):
        _need(0 <= getattr(cfg, name) < 1, f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(cfg, name)}")
    per_step = world * cfg.micro_batch
    _need(cfg.global_batch % per_step == 0,
          f"--global-batch must be a multiple of ranks x --micro-batch = {world} x {cfg.micro_batch} = {per_step}, "
          f"got {cfg.global_batch}")
    _need(cfg.recipe != "finetune" or cfg.init, "--recipe finetune needs --init PATH (a pretrain checkpoint folder, "
                                                "a pretrain run's --out folder or a weights file)")
    _check_init(cfg.init)
    _need(cfg.resume in ("auto", "none") or os.path.isdir(cfg.resume),
          f"--resume must be 'auto', 'none' or an existing checkpoint folder, got {cfg.resume!r}")
    _need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"--peak-tflops must be > 0, got {cfg.peak_tflops}")


# ---- model ----------------------------------------------------------------------------------------------------
def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """``create_model`` keywords for a fresh model; stored in config.json so a checkpoint can rebuild it."""
    kwargs = dict(num_classes=num_classes, img_size=cfg.img_size, proj_drop_rate=cfg.dropout,
                  pos_drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path, backend=cfg.backend)
    kwargs.update({k: getattr(cfg, k) for k in ARCH_FLAGS if getattr(cfg, k) is not None})
    return kwargs


def find_checkpoint(path) -> Path | None:
    """A training checkpoint folder: ``path`` itself, or the latest complete one in a run folder ``path``."""
    path = Path(path)
    if path.is_dir() and (path / ".metadata").is_file():
        checkpoint.check_complete(path)
        return path
    if path.is_dir():
        found = checkpoint.resume_candidates(path)
        if not found:
            raise ValueError(f"{path} holds no complete training checkpoint")
        return found[0]
    return None


def load_pretrained(init, model_name, overrides: dict):
    """Build a model and load pretrained weights: a fastvit training checkpoint (its stored architecture) or a
    weights file (``model_name`` with ``overrides``, headless). Returns (model, model name, constructor kwargs)."""
    ckpt = find_checkpoint(init)
    if ckpt is None:
        kwargs = {k: v for k, v in overrides.items() if k != "num_classes"}
        model = fastvit.create_model(model_name, num_classes=0, **kwargs)
        from fastvit.convert import load_checkpoint
        load_checkpoint(model, init)
        return model, model_name, {**kwargs, "num_classes": 0}
    stored = checkpoint.read_config(ckpt)["model"]
    bad = [k for k in ARCH_FLAGS if k in overrides and overrides[k] != stored["kwargs"].get(k)]
    if bad:
        flag = bad[0]
        raise ValueError(f"--{flag.replace('_', '-')} cannot change the architecture of checkpoint {ckpt} "
                         f"(checkpoint: {stored['kwargs'].get(flag)}, passed: {overrides[flag]})")
    kwargs = {**stored["kwargs"], **{k: v for k, v in overrides.items() if k not in ("num_classes", "img_size")}}
    model = fastvit.create_model(stored["name"], **kwargs)
    state = {"model": model.state_dict()}
    checkpoint.load(ckpt, state)
    return model, stored["name"], kwargs


def load_model_for_eval(init, model_name=None, img_size=None):
    """A model for feature extraction (``fastvit.fewshot``): from a checkpoint or weights file, or random."""
    if init is None:
        model = fastvit.create_model(model_name or RECIPE_DEFAULTS["pretrain"]["model"], num_classes=0,
                                     **({"img_size": img_size} if img_size else {}))
        return model, model.patch_embed.img_size[0]
    _check_init(init)
    model = load_pretrained(init, model_name or RECIPE_DEFAULTS["pretrain"]["model"],
                            {"img_size": img_size} if img_size else {})[0]
    if img_size and tuple(model.patch_embed.img_size) != (img_size, img_size):
        model.set_input_size(img_size=img_size)
    return model, model.patch_embed.img_size[0]


# ---- optimisation ---------------------------------------------------------------------------------------------
class WarmupDecay:
    """LambdaLR factor: linear warmup to 1 over ``warmup`` steps, then linear or cosine decay to 0 at ``total``.

    A class (not a closure) so that LambdaLR.state_dict() stores it."""

    def __init__(self, warmup: int, total: int, kind: str = "linear"):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model, weight_decay: float) -> list:
    """Weight decay on weight matrices only: 1-D parameters (biases, LayerNorm) and no_weight_decay() are exempt."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(cfg: TrainConfig, model):
    """The recipe's optimizer: AdamW (0.9, 0.999) to pre-train, SGD momentum 0.9 to fine-tune (the paper's)."""
    if cfg.recipe == "pretrain":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=0.9)


# ---- distributed ----------------------------------------------------------------------------------------------
@dataclass
class Env:
    """Where this process runs: its rank and the world size of the process group, and its device."""
    rank: int
    world: int
    device: torch.device


def device_and_backend(device="auto", dist_backend="auto") -> tuple[torch.device, str]:
    """This rank's device (cuda:<LOCAL_RANK> or cpu) and process-group backend (nccl on GPU, gloo on CPU)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    backend = dist_backend if dist_backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"--dist-backend must be 'auto', 'gloo' or 'nccl', got {dist_backend!r}")
    if backend == "nccl" and not use_cuda:
        raise ValueError("--dist-backend nccl needs CUDA; use gloo on CPU")
    return dev, backend


@contextlib.contextmanager
def _keep_thread_count():
    """A run sets torch's CPU thread count for its rank (process-wide); give the caller its own back after it."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def distributed(dist_backend="auto", device="auto"):
    """A process group for the run: torchrun's (env://), or a one-process group; torn down only if created here."""
    dev, backend = device_and_backend(device, dist_backend)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    created = not dist.is_initialized()
    if created:
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield Env(dist.get_rank(), dist.get_world_size(), dev)
    except BaseException:
        if created:  # no barrier: the other ranks may be waiting in a collective this rank will never join
            dist.destroy_process_group()
        raise
    if created:
        dist.barrier()  # every rank is done with collectives before the group goes away
        dist.destroy_process_group()


def default_out(cfg: TrainConfig) -> str:
    """runs/<data>-<recipe>-<time>, with rank 0's clock on every rank (collective)."""
    name = "digits" if cfg.data == "digits" else Path(cfg.data).name
    out = [f"runs/{name}-{cfg.recipe}-{datetime.now():%Y%m%d-%H%M%S}"]
    dist.broadcast_object_list(out, src=0)
    return out[0]


def _rank0_print(env, *args):
    if env.rank == 0:
        print(*args, flush=True)


# ---- metrics --------------------------------------------------------------------------------------------------
class MetricsLog:
    """JSON lines in <out>/metrics.jsonl, written by rank 0; on resume, rows after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled = path, enabled
        if enabled:
            rows = self.read(path) if path.exists() else []
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_step))

    @staticmethod
    def read(path) -> list:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def write(self, row: dict):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def plot_curves(metrics_path, png_path) -> None:
    """Loss, learning rate and held-out top-1 against step, as a PNG (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, data, key, title in ((axes[0], train, "loss", "training loss"), (axes[1], train, "lr", "learning rate"),
                                 (axes[2], evals, "eval_top1", "held-out top-1")):
        ax.plot([r["step"] for r in data], [r[key] for r in data], marker="o" if key == "eval_top1" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------------------
class _StopRequest:
    """Records SIGTERM so the run saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _failure(e: BaseException) -> str:
    """One line on why a load failed; DCP wraps each rank's exception in a CheckpointException."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(e.failures.items()))
        return f"rank {rank}: {type(inner).__name__}: {inner}".splitlines()[0]
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


class Run:
    """One training run: data, model, optimizer and schedule built from a config; ``fit()`` trains it."""

    def __init__(self, cfg: TrainConfig, env: Env):
        self.env = env
        cfg, filled = resolve(cfg, env.world)
        check(cfg, env.world)
        self.data = make_source(cfg.data, cfg.img_size, workers=cfg.workers)
        cfg = steps_for(cfg, self.data.num_train)
        if filled.get("warmup_steps") and cfg.warmup_steps >= cfg.steps:  # a default warmup longer than the run
            cfg = dataclasses.replace(cfg, warmup_steps=cfg.steps // 10)
        if env.device.type == "cpu" and (cfg.threads or "OMP_NUM_THREADS" not in os.environ):
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", env.world))
            torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // local_world))
        self.cfg = cfg
        if cfg.out is None:
            self.cfg = cfg = dataclasses.replace(cfg, out=default_out(cfg))
        self.out = Path(cfg.out)
        self.accum = cfg.global_batch // (env.world * cfg.micro_batch)
        preset = [f"{k}={getattr(cfg, k)}" for k, source in filled.items() if source == "preset"]
        if preset:
            _rank0_print(env, "digits preset (flags you pass win): " + " ".join(preset))
        self._build_model()
        if env.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        self.start, self.samples_seen, self.resumed_from = self.resume()
        _rank0_print(env, f"{cfg.recipe}: {self.model_name} ({sum(p.numel() for p in self.core.parameters()):,} "
                          f"params{', FSDP2' if cfg.fsdp else ''}) on {env.world} x {env.device.type}; "
                          f"global batch {cfg.global_batch} = {env.world} ranks x {cfg.micro_batch} micro x "
                          f"{self.accum} accumulation; {cfg.steps} steps, lr {cfg.lr:g}, warmup {cfg.warmup_steps}, "
                          f"{cfg.schedule} decay; out {self.out}")

    def _build_model(self):
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        kwargs = model_kwargs(cfg, self.data.num_classes)
        if cfg.init:
            model, self.model_name, kwargs = load_pretrained(cfg.init, cfg.model or RECIPE_DEFAULTS[cfg.recipe]
                                                             ["model"], kwargs)
            if tuple(model.patch_embed.img_size) != (cfg.img_size, cfg.img_size):
                model.set_input_size(img_size=cfg.img_size)
            model.reset_classifier(self.data.num_classes)
            kwargs.update(img_size=cfg.img_size, num_classes=self.data.num_classes)
        else:
            self.model_name = cfg.model
            model = fastvit.create_model(cfg.model, **kwargs)
        self.model_kwargs = kwargs
        model.to(env.device)
        self.core = model
        if cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
            mesh = init_device_mesh(env.device.type, (env.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
                # the model calls Block.forward_pair (to fuse residual adds across blocks), not Block.__call__
                register_fsdp_forward_method(block, "forward_pair")
            self.model = fully_shard(model, mesh=mesh)
        elif env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        else:
            self.model = model
        self.optimizer = make_optimizer(cfg, self.core)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupDecay(cfg.warmup_steps, cfg.steps, cfg.schedule))
        self.train_flops = train_flops_per_image(self.core)
        self.peak = peak_flops(env.device, cfg.peak_tflops)

    # -- state ------------------------------------------------------------------------------------------------
    def _state(self, step, samples_seen):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        rng = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return {"model": model_sd, "optim": optim_sd, f"rng/rank{self.env.rank}": rng,
                "trainer": {"step": step, "samples_seen": samples_seen, "scheduler": self.scheduler.state_dict(),
                            "world": self.env.world, "global_batch": self.cfg.global_batch}}

    def _config_json(self):
        return {"train": dataclasses.asdict(self.cfg), "model": {"name": self.model_name, "kwargs": self.model_kwargs}}

    def save(self, step, samples_seen):
        return checkpoint.save(self.out, step, self._state(step, samples_seen), self._config_json(), self.cfg.keep)

    def _load(self, path) -> tuple[int, int]:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = _clone(self._state(0, 0))  # load into copies: a failed load leaves the live model untouched
        rng_key = f"rng/rank{self.env.rank}"
        if not any(k.startswith(rng_key + ".") for k in checkpoint.saved_keys(path)):
            warnings.warn(f"{path} has no RNG state for rank {self.env.rank} (saved by another number of ranks); "
                          f"dropout draws will differ from an uninterrupted run", checkpoint.CheckpointWarning)
            del state[rng_key]
        checkpoint.load(path, state)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self._follow_flags()
        if rng_key in state:
            torch.set_rng_state(state[rng_key]["cpu"])
            if "cuda" in state[rng_key]:
                torch.cuda.set_rng_state(state[rng_key]["cuda"], self.env.device)
        return int(state["trainer"]["step"]), int(state["trainer"]["samples_seen"])

    def _follow_flags(self):
        """After a restore, take lr, schedule and weight decay from this run's flags (a resumed run may extend
        --steps): the same flags give bitwise the same values, changed ones apply from the next step."""
        cfg, groups = self.cfg, self.optimizer.param_groups
        fn = WarmupDecay(cfg.warmup_steps, cfg.steps, cfg.schedule)
        self.scheduler.lr_lambdas = [fn] * len(groups)
        self.scheduler.base_lrs = [cfg.lr] * len(groups)
        for group in groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * fn(self.scheduler.last_epoch)
        groups[0]["weight_decay"] = cfg.weight_decay  # param_groups(): [weight matrices, exempt]
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def resume(self):
        """Restore the latest usable checkpoint per --resume; returns (step, samples_seen, path or None)."""
        cfg, env = self.cfg, self.env
        if cfg.resume == "none":
            if checkpoint.resume_candidates(self.out, warn=False):
                raise ValueError(f"--out {self.out} already holds checkpoints; pass --resume auto to continue that "
                                 f"run or choose another --out")
            return 0, 0, None
        explicit = cfg.resume != "auto"
        candidates = [Path(cfg.resume)] if explicit else checkpoint.resume_candidates(self.out, warn=env.rank == 0)
        for path in candidates:
            try:
                if explicit:
                    checkpoint.check_complete(path)
                step, seen = self._load(path)
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                reason = _failure(e)
                if explicit:
                    raise ValueError(f"--resume {path}: cannot load it ({reason})") from e
                if env.rank == 0:
                    warnings.warn(f"skipping checkpoint {path}: loading failed ({reason})",
                                  checkpoint.CheckpointWarning)
                continue
            _rank0_print(env, f"resumed from {path} (step {step})")
            return step, seen, path
        self.optimizer.state.clear()  # get_state_dict() initialised it for the load template
        return 0, 0, None

    # -- evaluation -------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Top-1 on the held-out split, sharded over ranks."""
        self.core.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y, valid in eval_batches(self.data.test, 2 * self.cfg.micro_batch, self.env.world, self.env.rank,
                                        self.cfg.workers if self.cfg.data != "digits" else 0, desc="eval"):
            with self._autocast():
                pred = self.core(x.to(self.env.device, non_blocking=True)).argmax(1).cpu()
            counts += torch.tensor([((pred == y) & valid).sum().item(), valid.sum().item()], dtype=torch.float64)
        self.core.train()
        counts = counts.to(self.env.device)
        dist.all_reduce(counts)
        return (counts[0] / counts[1]).item()

    def _plain_model(self):
        """The model without sharding (FSDP2: a full copy built from the gathered state dict)."""
        if not self.cfg.fsdp:
            return self.core
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        model = fastvit.create_model(self.model_name, **self.model_kwargs).to(self.env.device)
        model.load_state_dict(full)
        return model

    # -- training ---------------------------------------------------------------------------------------------
    def _sync_grads(self, enabled: bool):
        """Gradient reduction only on the last micro-batch of a step."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if not enabled and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _step(self, batches, stop: _StopRequest, step: int):
        """Forward/backward over the accumulation steps, then clip and update; returns (loss, grad norm, stop)."""
        cfg, dev = self.cfg, self.env.device
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for j in range(self.accum):
            x, y = next(batches)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with self._sync_grads(j == self.accum - 1):
                with self._autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                # mean over the global batch: DDP/FSDP average over ranks, so scale by micro*ranks/global = 1/accum
                (loss / self.accum).backward()
            loss_sum += loss.detach().double() * len(y)
        stats = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=dev, dtype=torch.float64)])
        dist.all_reduce(stats)
        loss = (stats[0] / cfg.global_batch).item()
        norm = torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else
                                              float("inf"))
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            last = checkpoint.resume_candidates(self.out, warn=False)
            raise FloatingPointError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} "
                f"(loss {loss}, grad norm {norm}); stopping without saving. Last good checkpoint: "
                f"{last[0] if last else 'none'}. Lower --lr or raise --warmup-steps.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, bool(stats[1].item() > 0)

    def fit(self, on_step_end=None) -> dict:
        """Train to cfg.steps (resuming per --resume) and return the final metrics.

        ``on_step_end(step, row)`` is called on every rank after each step (and its checkpoint, if any)."""
        cfg, env = self.cfg, self.env
        start, seen, resumed_from = self.start, self.samples_seen, self.resumed_from
        if env.rank == 0:
            checkpoint.remove_incomplete(self.out)
            checkpoint.write_config(self.out, self._config_json())
        if resumed_from is None:
            torch.manual_seed(mix_seed(cfg.seed, env.rank, 0xD70))  # dropout / drop-path stream of this rank
        log = MetricsLog(self.out / "metrics.jsonl", env.rank == 0, start if resumed_from else 0)
        sampler = GlobalSampler(self.data.num_train, cfg.seed)
        plan = micro_batch_plan(sampler, cfg.seed, start, seen, cfg.steps, cfg.global_batch, cfg.micro_batch,
                                env.world, env.rank)
        batches = self.data.loader(plan, cfg.seed)
        bar = progress(total=cfg.steps, initial=start, disable=env.rank != 0, desc=cfg.recipe)
        step, top1, saved_at, stopped = start, None, start if resumed_from else None, False
        speed, t_run = None, time.perf_counter()
        self.core.train()
        with _StopRequest() as stop:
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                loss, norm, stopped = self._step(batches, stop, step)
                step, seen = step + 1, seen + cfg.global_batch
                dt = time.perf_counter() - t0
                speed = cfg.global_batch / dt if speed is None else 0.9 * speed + 0.1 * cfg.global_batch / dt
                row = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "img_per_s": cfg.global_batch / dt,
                       "epoch": seen / self.data.num_train, "time": time.perf_counter() - t_run}
                if self.peak:
                    row["mfu"] = row["img_per_s"] * self.train_flops / (self.peak * env.world)
                log.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    top1 = self.evaluate()
                    log.write({"step": step, "eval_top1": top1})
                    if env.rank == 0:
                        bar.write(f"step {step}: held-out top-1 {100 * top1:.2f}%")
                if stopped or step % cfg.save_every == 0 or step == cfg.steps:
                    self.save(step, seen)
                    saved_at = step
                if on_step_end is not None:
                    on_step_end(step, row)
                if stopped:
                    if env.rank == 0:
                        bar.write(f"SIGTERM: saved checkpoint at step {step}; exiting")
                    break
        bar.close()
        if top1 is None and not stopped:  # resumed at the end: report the final accuracy again
            top1 = self.evaluate()
        if saved_at != step:
            self.save(step, seen)
        result = {"step": step, "top1": top1, "out": str(self.out), "stopped_by_signal": stopped,
                  "train_time_s": time.perf_counter() - t_run}
        if cfg.fewshot and not stopped:
            result["fewshot"] = self._fewshot()
        if env.rank == 0:
            log.write({"step": step, "final_top1": top1, "train_time_s": result["train_time_s"],
                       **({"fewshot": result["fewshot"]} if "fewshot" in result else {})})
            plot_curves(log.path, self.out / "curves.png")
            accuracy = "stopped before an evaluation" if top1 is None else f"held-out top-1 {100 * top1:.2f}%"
            print(f"{accuracy} at step {step}; {result['train_time_s']:.1f} s; metrics {log.path}, "
                  f"curves {self.out / 'curves.png'}", flush=True)
        return result

    def _fewshot(self):
        from fastvit import fewshot
        model = self._plain_model()
        results = None
        if self.env.rank == 0:
            results = fewshot.evaluate(model, self.data.train_eval, self.data.test)
            print(f"few-shot: {fewshot.format_results(results)}", flush=True)
        box = [results]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def train(cfg: TrainConfig, on_step_end=None) -> dict:
    """Run one training run (inside torchrun, or on one process) and return its final metrics."""
    with _keep_thread_count(), distributed(cfg.dist_backend, cfg.device) as env:
        return Run(cfg, env).fit(on_step_end)


def main(argv=None) -> list:
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        device_and_backend(cfg.device, cfg.dist_backend)
    except ValueError as e:
        parser.error(str(e))
    results = []
    try:
        with _keep_thread_count(), distributed(cfg.dist_backend, cfg.device) as env:
            try:
                check(resolve(cfg, env.world)[0], env.world)  # before the loop over --seeds
            except ValueError as e:
                parser.error(str(e))
            cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
            for i in range(cfg.seeds):
                run_cfg = cfg
                if cfg.seeds > 1:  # one run folder per seed
                    run_cfg = dataclasses.replace(cfg, seed=cfg.seed + i, out=f"{cfg.out}/seed_{cfg.seed + i}")
                try:
                    run = Run(run_cfg, env)
                except ValueError as e:
                    parser.error(str(e))
                results.append(run.fit())
            if cfg.seeds > 1:
                top1 = np.array([r["top1"] for r in results]) * 100
                _rank0_print(env, f"held-out top-1 over {cfg.seeds} seeds: {top1.mean():.2f} ± "
                                  f"{top1.std(ddof=1):.2f}% ({', '.join(f'{t:.2f}' for t in top1)})")
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
