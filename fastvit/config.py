"""Every option of a training run: the ``TrainConfig`` dataclass (one flag per field), the recipe and preset tables
that fill the options left unset, the ``python -m fastvit.train`` parser built from the dataclass, and the one
check of a resolved config.

Recipes (flags always win; with ``--data digits`` a small-data preset replaces the paper's batch/lr/warmup):
- pretrain: AdamW (0.9, 0.999), decoupled weight decay on weight matrices only, linear warmup then linear (or cosine)
  decay, grad-norm clip 1.0, dropout 0.1, global batch 4096 with the lr given at that batch (3e-3, wd 0.3: the
  paper's ImageNet setting; with another --global-batch and no --lr the lr is scaled linearly).
- finetune: SGD momentum 0.9, batch 512, no weight decay, 500 warmup steps, cosine decay, from ``--init`` (a
  pretrain checkpoint) with a zero-initialised head (``reset_classifier``) and ``set_input_size`` to ``--img-size``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch

import fastvit
from fastvit.data.sources import DECODERS, decode_problem
from fastvit.dist import DEFAULT_TIMEOUT_S
from fastvit.model import POS_EMBED_AT, POS_EMBEDS

DESCRIPTION = ("Train a ViT (pretrain) or fine-tune one (--recipe finetune --init RUN): on the embedded digits by "
               "default, or on an ImageFolder or WebDataset shards (--data). The recipe (and, on digits, a small-data "
               "preset) fills every flag you leave out; what it chose is printed at the start.")

RECIPES = ("pretrain", "finetune")
PRECISIONS = ("auto", "bf16", "fp32")
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
ARCH_FLAGS = ("patch_size", "embed_dim", "depth", "num_heads", "pos_embed", "pos_embed_at")
ARCH_SIZES = ("patch_size", "embed_dim", "depth", "num_heads")  # the architecture flags that are counts
# what of the pre-training digits preset is its tiny ViT: none of it applies where --model names one
PRESET_MODEL = ("model", *ARCH_SIZES, "img_size")
MAX_DEFAULT_MICRO = 128


def _opt(help, **kw):
    return field(default=kw.pop("default", None), metadata=dict(help=help, **kw))


@dataclass
class TrainConfig:
    """Every option of a run; ``python -m fastvit.train --help`` lists them as flags (``--global-batch`` for
    ``global_batch``). None means: the recipe's default, or the digits preset's with ``--data digits``."""
    model: str | None = _opt("registered model name (fastvit.list_models())")
    data: str = _opt("'digits' (scikit-learn's bundled 8x8 digits), an ImageFolder root with train/ and val/, a "
                     "folder whose train/ and val/ hold WebDataset .tar shards, or a shard pattern such as "
                     "'train-{0000..0999}.tar' (with --val-data)", default="digits")
    val_data: str | None = _opt("held-out shards when --data is a shard pattern (a pattern or a folder of .tar)")
    recipe: str = _opt("pretrain (AdamW) or finetune (SGD from --init)", default="pretrain", choices=RECIPES)
    init: str | None = _opt("start from these weights: a step folder, a run's --out folder (its latest "
                            "checkpoint) or a timm/torchvision/HF/.npz weights file; finetune gives the model a new "
                            "zero head, pretrain (a warm start) keeps a head of the data's class count")
    img_size: int | None = _opt("input resolution (finetune: the model is resampled to it)", type=int)
    patch_size: int | None = _opt("override the model's patch size", type=int)
    embed_dim: int | None = _opt("override the model's width", type=int)
    depth: int | None = _opt("override the model's number of blocks", type=int)
    num_heads: int | None = _opt("override the model's number of heads", type=int)
    pos_embed: str | None = _opt("position embedding (the paper's Table 8): learn (1-D), learn_2d, none, rel "
                                 "(a learned per-head bias over 2-D offsets, BEiT's, not the paper's 1-D relative "
                                 "attention) (default: the model's, or the --init checkpoint's)",
                                 choices=POS_EMBEDS)
    pos_embed_at: str | None = _opt("where learned position tables are added: stem, every_layer, "
                                    "every_layer_shared (default: the model's, or the --init checkpoint's)",
                                    choices=POS_EMBED_AT)
    global_batch: int | None = _opt("images per optimizer step over all ranks", type=int)
    micro_batch: int | None = _opt("images per rank per forward (global = ranks x micro x accumulation; default: "
                                   f"the largest divisor of global/ranks up to {MAX_DEFAULT_MICRO})", type=int)
    steps: int | None = _opt("optimizer steps (or --epochs)", type=int)
    epochs: float | None = _opt("passes over the training set (or --steps)", type=float)
    lr: float | None = _opt("peak learning rate at --global-batch (the table's lr is given at the table's batch and "
                            "scaled linearly to the --global-batch you pass)", type=float)
    weight_decay: float | None = _opt("weight decay on weight matrices: decoupled in pretrain's AdamW; in finetune's "
                                      "SGD (none by default) an L2 term in the gradient", type=float)
    warmup_steps: int | None = _opt("linear warmup steps", type=int)
    schedule: str | None = _opt("decay after warmup", choices=SCHEDULES)
    clip_grad: float = _opt("clip the global gradient norm to this (0: off)", default=1.0, type=float)
    dropout: float | None = _opt("dropout after dense layers and position embedding", type=float)
    drop_path: float = _opt("stochastic depth rate", default=0.0, type=float)
    label_smoothing: float = _opt("cross-entropy label smoothing", default=0.0, type=float)
    seed: int = _opt("seed of the model init, data order and augmentation", default=0, type=int)
    seeds: int = _opt("repeat the run with seeds seed..seed+N-1 and report top-1 mean ± std", default=1, type=int)
    out: str | None = _opt("run folder: checkpoints, metrics.jsonl, curves.png (default runs/<data>-<recipe>-<time>; "
                           "under torchrun runs/<data>-<recipe>-<run id>, which a restarted job finds again)")
    resume: str = _opt("'auto' (latest complete checkpoint in --out, if any), 'none', or a checkpoint folder (or a "
                       "run folder: its latest complete one) of the same run",
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
    workers: int | None = _opt("data-loading worker processes per rank (ImageFolder, shards; default: this "
                               "rank's share of the usable CPUs, at most 4)", type=int)
    decode: str = _opt("where training images are decoded and augmented: cpu (in the loader workers), gpu "
                       "(batched torchvision.io.decode_jpeg on CUDA, crop/flip/normalise there) or dali (NVIDIA DALI "
                       "decodes, crops, resizes, flips and normalises on CUDA; the [dali] extra)", default="cpu",
                       choices=DECODERS)
    max_bad_frac: float = _opt("stop with an error once the unreadable samples drawn exceed this fraction of "
                               "max(samples drawn, training-set size); each one is replaced and counted",
                               default=1e-3, type=float)
    dist_timeout: float = _opt("seconds a rank waits for the others (start-up and every collective) before it "
                               "fails, so torchrun can restart the job", default=DEFAULT_TIMEOUT_S, type=float)
    threads: int | None = _opt("CPU threads per rank (0: OMP_NUM_THREADS if set, else cores / local ranks); the "
                               "digits preset uses 1: threads only add overhead on its tiny tensors", type=int)
    layer_decay: float | None = _opt("layer-wise lr decay: the head trains at lr, block i of L (and the final norm "
                                     "with the last block) at lr x decay^(L - i), the stem at lr x decay^(L + 1) "
                                     "(fine-tuning; BEiT's rule as timm applies it over model.group_matcher())",
                                     type=float)
    precision: str = _opt("autocast: auto (bf16 on CUDA, none on CPU), bf16 or fp32 (no autocast)", default="auto",
                          choices=PRECISIONS)
    residual_dtype: str = _opt("dtype of the residual stream under autocast: float32 or the autocast dtype "
                               "('autocast'; 4 D fewer bytes kept per token and block)", default="float32",
                               choices=("float32", "autocast"))
    compile: bool = _opt("torch.compile the training forward and backward (inductor; evaluation stays eager)",
                         default=False, action="store_true")
    compile_mode: str | None = _opt("torch.compile mode (default, reduce-overhead, max-autotune, ...; implies "
                                    "--compile)")
    cuda_graphs: bool = _opt("replay the training forward and backward as CUDA graphs (torch.compile mode "
                             "reduce-overhead) and update with torch's fused optimizer kernels (CUDA only)",
                             default=False, action="store_true")
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
                       + ["digits preset (--data digits, replaces the recipe's values it names; with --model, "
                          "that model as named, at the recipe's img_size, with the rest of the preset):"]
                       + [f"  {name}: {_table(values)}" for name, values in DIGITS_PRESET.items()])
    parser = argparse.ArgumentParser(prog="python -m fastvit.train", description=DESCRIPTION,
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
            if source == "preset" and cfg.init and name in ARCH_SIZES:
                continue  # so under any recipe: the preset's sizes would read as flags that change it
            if source == "preset" and "model" in table and cfg.model is not None and name in PRESET_MODEL:
                continue  # a named model keeps its own architecture (so400m/14 stays patch 14) and the recipe's size
            if getattr(cfg, name) is None and name not in values:
                values[name], filled[name] = value, source
    if filled.get("lr") and "global_batch" not in filled and cfg.global_batch:
        # the table's lr is given at the table's batch: scale it linearly to the --global-batch passed
        table = preset if filled["lr"] == "preset" else RECIPE_DEFAULTS[cfg.recipe]
        values["lr"] = table["lr"] * cfg.global_batch / table["global_batch"]
    if cfg.workers is None:  # more workers than CPUs only adds switching (and DataLoader's warning)
        values["workers"] = min(4, cpus_per_local_rank(world))
    cfg = dataclasses.replace(cfg, **values)
    if cfg.micro_batch is None and isinstance(cfg.global_batch, int) and cfg.global_batch > 0 \
            and cfg.global_batch % world == 0:
        per_rank = cfg.global_batch // world
        micro = max(d for d in range(1, min(per_rank, MAX_DEFAULT_MICRO) + 1) if per_rank % d == 0)
        cfg = dataclasses.replace(cfg, micro_batch=micro)
    return cfg, filled


def cpus_per_local_rank(world: int) -> int:
    """The CPUs this process may run on (its affinity mask, as DataLoader counts them), shared among the ranks that
    torchrun started on this machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def steps_for(cfg: TrainConfig, num_train: int) -> TrainConfig:
    """Turn --epochs into --steps (global batches of the stream, the last one rounded up) in a checked config."""
    if cfg.steps is not None:
        return cfg
    return dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * num_train / cfg.global_batch)))


def short_warnings() -> None:
    """In the command-line tools: fastvit's own warnings print as 'warning: message' lines, not as Python's
    'path:line: Category: message' with the source line that raised them; others print as Python prints them.
    Either kind starts a line of its own where a progress bar is running: on a terminal above the bar, in a log
    file after the bar's last state (tqdm writes a bar's updates to one line, ending it only when the bar closes).
    (Not on a terminal, ``showwarning`` stays Python's, so that recorders such as pytest.warns see them.)"""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if category.__module__.startswith("fastvit") or f"{os.sep}fastvit{os.sep}" in filename:
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    if sys.stderr.isatty():  # on a terminal, above the progress bar instead of appended to its line
        warnings.formatwarning = format_warning

        def show_warning(message, category, filename, lineno, file=None, line=None):
            from tqdm import tqdm
            tqdm.write(format_warning(message, category, filename, lineno, line).rstrip("\n"),
                       file=file or sys.stderr)

        warnings.showwarning = show_warning
        return

    def format_in_log(message, category, filename, lineno, line=None):
        # after a running bar's line (two warnings in a row get a blank line between them: the bar may have
        # written between them or not)
        from tqdm import tqdm
        text = format_warning(message, category, filename, lineno, line)
        return "\n" + text if getattr(tqdm, "_instances", None) else text

    warnings.formatwarning = format_in_log


def plural(n, word: str) -> str:
    """'1 rank', '2 ranks': a count and its noun, as printed messages say it."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _need(ok, msg):
    if not ok:
        raise ValueError(msg)


def check_init(init):
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
    for name in ARCH_SIZES:
        value = getattr(cfg, name)
        _need(value is None or (isinstance(value, int) and value >= 1),
              f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if cfg.compile_mode is not None:
        from torch._inductor import list_mode_options  # torch.compile's modes, as this torch knows them
        modes = tuple(list_mode_options())
        _need(cfg.compile_mode in modes, f"--compile-mode must be one of {modes}, got {cfg.compile_mode!r}")
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
    check_init(cfg.init)
    _need(cfg.out is None or not os.path.exists(cfg.out) or os.path.isdir(cfg.out),
          f"--out {cfg.out!r} is a file; --out names the run's folder")
    _need(cfg.resume in ("auto", "none") or os.path.isdir(cfg.resume),
          f"--resume must be 'auto', 'none' or an existing checkpoint folder (or run folder), got {cfg.resume!r}")
    _need(cfg.pos_embed_at in (None, "stem") or cfg.pos_embed in (None, "learn", "learn_2d"),
          f"--pos-embed-at {cfg.pos_embed_at} needs --pos-embed learn or learn_2d (position tables to add), got "
          f"--pos-embed {cfg.pos_embed}")
    _need(cfg.data != "digits" or cfg.val_data is None,
          f"--val-data {cfg.val_data!r} has nothing to do with --data digits (its held-out split is built in); it "
          f"goes with a shard pattern --data")
    _need(cfg.peak_tflops is None or cfg.peak_tflops > 0, f"--peak-tflops must be > 0, got {cfg.peak_tflops}")
    _need(0 <= cfg.max_bad_frac <= 1, f"--max-bad-frac must be in [0, 1], got {cfg.max_bad_frac}")
    _need(cfg.dist_timeout > 0, f"--dist-timeout must be > 0 seconds, got {cfg.dist_timeout}")
    _need(cfg.layer_decay is None or 0 < cfg.layer_decay <= 1,
          f"--layer-decay must be in (0, 1], got {cfg.layer_decay}")
    _need(cfg.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.cuda_graphs:
        _need(cfg.device != "cpu" and torch.cuda.is_available(),
              "--cuda-graphs needs a CUDA device (none is available here, or --device cpu); use --compile on CPU")
        _need(cfg.compile_mode in (None, "reduce-overhead"),
              f"--cuda-graphs is torch.compile's mode reduce-overhead; it cannot be combined with --compile-mode "
              f"{cfg.compile_mode}")
    on_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    _need(cfg.backend != "triton" or on_cuda or fastvit.ops.triton_interpreting(),
          "--backend triton needs a CUDA device (or TRITON_INTERPRET=1 to run the kernels on CPU); use --backend "
          "auto or torch here")
    problem = decode_problem(cfg.decode, cfg.data == "digits", "cuda" if on_cuda else None)
    _need(problem is None, problem)
