"""Helpers shared by the benchmark scripts: model names, fastvit/timm pairs on the same weights, error statistics,
output files and the fastvit-vs-timm bar chart (FLOPs live in ``fastvit.flops``, saved-activation counting in
``fastvit.memory``).

Only ``os``/``sys``/``torch`` are imported at module level: fastvit and timm import triton, and the interpreter
switch (``TRITON_INTERPRET``) must be set before that happens (see :func:`reexec_with_interpreter`).

Tests import this file by path (bench/ is not a package)::

    spec = importlib.util.spec_from_file_location("bench_common", "bench/common.py")

bench/profile.py shares its name with the standard library's ``profile``, which cProfile imports (and torch._dynamo
and torch.distributed.checkpoint import cProfile). So the scripts append bench/ to sys.path rather than prepend it
(a process that loads them by path, and the processes it spawns, keep the standard module), and importing this file
loads the standard module first (a script run from bench/ has bench/ first on sys.path).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import sys
import sysconfig
import textwrap
import time


def _load_stdlib_profile():
    if "profile" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("profile",
                                                  os.path.join(sysconfig.get_paths()["stdlib"], "profile.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile"] = module
    spec.loader.exec_module(module)


_load_stdlib_profile()

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Short names of the paper's models.
ALIASES = {"B/16": "vit_base_patch16_224", "L/16": "vit_large_patch16_224", "H/14": "vit_huge_patch14_224"}

# Configs small enough for CPU runs; any other name is looked up in fastvit's (and timm's) registry.
CONFIGS = {
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10),
    "mini": dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3, num_classes=10),
}


def interpreting():
    """Whether Triton kernels run through the interpreter (set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreter_note():
    """What a timing script adds to its label when the kernels ran in Triton's interpreter (--interpret): its
    numbers are then Python's speed, not the kernels'."""
    return " [TRITON_INTERPRET=1: the kernels ran in Triton's interpreter, times are not a benchmark]" \
        if interpreting() else ""


def reexec_with_interpreter(argv=None):
    """With ``--interpret`` in argv and TRITON_INTERPRET unset, restart this script with TRITON_INTERPRET=1.

    Must run before anything imports triton (fastvit, timm), because triton reads the variable at import.
    """
    argv = sys.argv if argv is None else argv
    if "--interpret" in argv and not interpreting():
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable] + argv, dict(os.environ, TRITON_INTERPRET="1"))


def split_list(text):
    """'a,b' -> ['a', 'b'] (argparse values that name several models, ops or dtypes)."""
    return [t.strip() for t in text.split(",") if t.strip()]


def choice_list(parser, text, choices, what):
    """``split_list`` that stops with argparse's usage error, naming the valid choices, on an unknown name."""
    names = split_list(text)
    if not names:
        parser.error(f"no {what} given; expected names from {tuple(choices)}")
    for name in names:
        if name not in choices:
            parser.error(f"unknown {what} {name!r}; expected names from {tuple(choices)}")
    return names


def check_step_args(parser, args):
    """Usage errors for the batch and compile flags throughput.py and profile.py share: a given --global-batch /
    --micro-batch must be positive (None takes the default; 0 used to stand for it silently), --warmup at least 0,
    and --compile-mode needs --compile (it was ignored without it)."""
    for flag in ("global_batch", "micro_batch"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if args.compile_mode != "default" and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs --compile")


def is_model_name(name) -> bool:
    """Whether :func:`build_model` builds ``name``: a short name (B/16), a config name (tiny) or a registry name."""
    import fastvit
    key = canonical(name)
    return key in CONFIGS or fastvit.is_model(key)


def model_list(parser, text):
    """A comma list of model names, checked before anything runs: argparse's usage error on an empty list or an
    unknown name (instead of a traceback once the models before it were measured)."""
    names = split_list(text)
    if not names:
        parser.error(f"no model given; expected {sorted(ALIASES)}, {sorted(CONFIGS)} or a fastvit.list_models() name")
    for name in names:
        if not is_model_name(name):
            parser.error(f"unknown model {name!r}; expected one of {sorted(ALIASES)}, {sorted(CONFIGS)} or a "
                         f"fastvit.list_models() name")
    return names


def canonical(name):
    """'B/16' -> 'vit_base_patch16_224'; config names and registry names pass through."""
    return ALIASES.get(name, name)


def build_model(name, impl="fastvit", backend="auto", num_classes=None, seed=0):
    """One model, ``impl`` 'fastvit' or 'timm', for a config name, a short name (B/16) or a registry name.

    ``num_classes`` overrides the config's head (e.g. 1000 for a headless in21k config when training).
    """
    import fastvit
    import timm
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    if impl not in ("fastvit", "timm"):
        raise ValueError(f"impl must be 'fastvit' or 'timm', got {impl!r}")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    torch.manual_seed(seed)
    key = canonical(name)
    if key in CONFIGS:
        cfg = dict(CONFIGS[key], **kwargs)
        return fastvit.VisionTransformer(**cfg, backend=backend) if impl == "fastvit" else TimmViT(**cfg)
    if key in fastvit.list_models():
        if impl == "fastvit":
            return fastvit.create_model(key, backend=backend, **kwargs)
        return timm.create_model(key, **kwargs)
    raise ValueError(f"unknown model {name!r}: expected one of {sorted(ALIASES)}, {sorted(CONFIGS)} "
                     f"or a fastvit.list_models() name")


def build_pair(name, backend="auto", num_classes=None, seed=0, class_token_inference=False):
    """(fastvit model, timm model) for ``name`` with identical weights (timm loads fastvit's state_dict, strict);
    ``class_token_inference``: fastvit's ``set_class_token_inference`` (:func:`add_class_token_inference_flag`)."""
    ours = build_model(name, "fastvit", backend, num_classes, seed)
    ours.set_class_token_inference(class_token_inference)
    ref = build_model(name, "timm", backend, num_classes, seed)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def add_class_token_inference_flag(parser):
    """--class-token-inference (the default) / --no-class-token-inference, for the scripts that time fastvit's
    inference against timm's: fastvit's best mode runs the last block on the class token alone
    (``VisionTransformer.set_class_token_inference``; its logits agree with the whole computation to rounding)."""
    parser.add_argument("--class-token-inference", action=argparse.BooleanOptionalAction, default=True,
                        help="fastvit's inference runs its last block on the class token alone (logits equal to "
                             "rounding); --no-class-token-inference runs every row, as timm does")


def sync(device):
    """Wait for the device's queued work (a timing boundary); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_stats(out, ref):
    """max |out - ref| and mean relative error sum|out - ref| / sum|ref|, computed in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    diff = (out - ref).abs()
    return {"max_abs": diff.max().item(), "mean_rel": (diff.sum() / ref.abs().sum().clamp_min(1e-300)).item()}


def environment():
    """Versions and hardware, stored with every result file."""
    import triton
    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "triton_interpret": interpreting(), "cuda": torch.cuda.is_available(),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        info["timm"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def out_dir(path, parser=None):
    """The output folder ``path``, created if missing. Scripts call it before their work, with their ``parser``,
    so that an --out that is a file or cannot be created is a usage error at once, not a traceback that loses a long
    run's results when it saves."""
    p = pathlib.Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "is a file, expected a folder" if p.exists() else f"cannot be created ({e.strerror or e})"
        message = f"--out {path} {why}"
        if parser is None:
            raise SystemExit(f"error: {message}") from None
        parser.error(message)
    return p


def write_json(path, data):
    """Write a result file the same way in every script (UTF-8, indented, one trailing newline); values JSON
    cannot hold (devices, dtypes, paths) are written as their str() instead of failing the run at the end."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def write_result(path, result, args, t_start, complete=True):
    """Write a script's result file with the fields every one of them has, under the same names: ``args``,
    ``env`` (:func:`environment`), ``complete`` (False while a run is part-way: scripts rewrite their file as rows
    finish, so a run stopped by a time limit keeps them) and ``seconds`` since ``t_start``."""
    data = {**result, "complete": complete, "seconds": time.perf_counter() - t_start, "args": vars(args),
            "env": environment()}
    write_json(path, data)
    return data


def set_title(ax, title, fontsize=9):
    """The axes' title, each line wrapped to the figure's width: a run's description is longer than a 5-inch
    chart, and matplotlib cuts it at the edges instead of wrapping."""
    chars = max(20, int(ax.figure.get_figwidth() * 72 / (0.6 * fontsize)))  # ~0.6 em per character
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in title.split("\n")), fontsize=fontsize)


def bar_chart(rows, value, labels, ylabel, path, title, log_if_spread=False, columns=("fastvit", "timm")):
    """Bars side by side per row, one per column (fastvit and timm by default), with each row's ``ratio`` above
    its group.

    ``value(row, column)`` is the bar height; ``labels`` the x tick per row. ``log_if_spread``: log scale when the
    values span more than 20x (throughput of tiny and large models in one chart).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(rows))
    w = 0.76 / len(columns)
    fig, ax = plt.subplots(figsize=(max(5, (1.2 + 0.25 * len(columns)) * len(rows)), 4))
    for i, column in enumerate(columns):
        shift = (i - (len(columns) - 1) / 2) * w
        ax.bar([x + shift for x in xs], [value(r, column) for r in rows], w, label=column)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['ratio']:.2f}x", (x, max(value(r, c) for c in columns)), ha="center", va="bottom",
                    fontsize=8)
    values = [value(r, c) for r in rows for c in columns]
    log = log_if_spread and max(values) > 20 * min(values)
    if log:
        ax.set_yscale("log")
    # headroom above the tallest bar and its ratio for the legend (two columns a row): it covered a bar before
    legend_rows = -(-len(columns) // 2)
    ax.set_ylim(top=max(values) * ((8 if log else 1.15) + legend_rows * (4 if log else 0.12)))
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    set_title(ax, title)
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_table(header, rows):
    """A GitHub markdown table from a header and rows of already-formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
