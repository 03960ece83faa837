"""The residual stream in fp32 or in the autocast dtype (``residual_dtype``): bytes kept, step time, accuracy.

    python bench/residual_dtype.py [--seeds 3] [--model B/16] [--out results]

For each choice, under bf16 autocast:
- activation bytes saved for backward per image of ``--model`` (``fastvit.memory``, batch 1);
- the training step time of that model (median of ``--steps`` steps at ``--micro-batch``; on CPU a smaller model,
  ``tiny``, unless ``--model`` is given, since a B/16 step takes seconds there);
- held-out top-1 of the default digits run (``python -m fastvit.train --precision bf16 --residual-dtype ...``)
  over ``--seeds`` seeds.
Writes ``residual_dtype.json`` and prints a table; the README's choice of default cites it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastvit.config import TrainConfig  # noqa: E402
from fastvit.memory import saved_activation_bytes  # noqa: E402
from fastvit.model import RESIDUAL_DTYPES  # noqa: E402
from fastvit.train import train  # noqa: E402

CHOICES = ("float32", "autocast")


def step_time(model, device, micro_batch, steps):
    """Median seconds of a bf16-autocast training step (forward, backward, SGD update) of ``model``."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    size = model.patch_embed.img_size
    x = torch.randn(micro_batch, 3, *size, device=device)
    y = torch.randint(0, model.num_classes, (micro_batch,), device=device)
    times = []
    for i in range(steps + 1):
        common.sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        common.sync(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def digits_top1(residual_dtype, seed, steps):
    with tempfile.TemporaryDirectory() as out:
        return train(TrainConfig(out=out, precision="bf16", residual_dtype=residual_dtype, seed=seed,
                                 steps=steps))["top1"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model for bytes and step time (default: B/16; tiny for the step "
                                                  "time on CPU)")
    p.add_argument("--micro-batch", type=int, default=None, help="step-time batch (default 64 on GPU, 32 on CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per choice")
    p.add_argument("--seeds", type=int, default=3, help="digits runs per choice")
    p.add_argument("--digits-steps", type=int, default=None, help="steps of each digits run (default: the preset's)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.model is not None:
        common.model_list(p, args.model)
    if args.steps < 1 or args.seeds < 1 or (args.micro_batch is not None and args.micro_batch < 1) or \
            (args.digits_steps is not None and args.digits_steps < 1):
        p.error("--steps, --seeds, --micro-batch and --digits-steps must be at least 1")
    out = common.out_dir(args.out, p)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bytes_model = args.model or "B/16"
    time_model = args.model or ("B/16" if device.type == "cuda" else "tiny")
    micro = args.micro_batch or (64 if device.type == "cuda" else 32)
    rows = []
    for choice in CHOICES:
        model = common.build_model(bytes_model, backend="auto")
        model.residual_dtype = RESIDUAL_DTYPES[choice]
        size = model.patch_embed.img_size
        kept = saved_activation_bytes(model, torch.randn(1, 3, *size)) / 2 ** 20
        model = common.build_model(time_model, backend="auto").to(device)
        model.residual_dtype = RESIDUAL_DTYPES[choice]
        seconds = step_time(model, device, micro, args.steps)
        tops = [100 * digits_top1(choice, seed, args.digits_steps) for seed in range(args.seeds)]
        rows.append(dict(residual_dtype=choice, saved_mib_per_image=kept, model=bytes_model,
                         step_s=seconds, step_model=time_model, micro_batch=micro, device=str(device),
                         digits_top1=tops, digits_top1_mean=statistics.mean(tops)))
    print(common.markdown_table(
        ["residual_dtype", f"{bytes_model} MiB/img kept", f"{time_model} step (ms, micro {micro}, {device.type})",
         f"digits top-1 % ({args.seeds} seeds)"],
        [[r["residual_dtype"], f"{r['saved_mib_per_image']:.1f}", f"{1e3 * r['step_s']:.1f}",
          f"{r['digits_top1_mean']:.2f} ({', '.join(f'{t:.2f}' for t in r['digits_top1'])})"] for r in rows]))
    path = os.path.join(out, "residual_dtype.json")
    common.write_result(path, dict(rows=rows), args, t_start)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
