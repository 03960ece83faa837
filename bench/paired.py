#!/usr/bin/env python
"""fastvit vs timm on the same weights, interleaved call by call: the median of per-pair time ratios.

bench/throughput.py times whole global batches per column in rotation; on a shared CPU whose load changes from one
second to the next, its ratios move by +-15% between runs. Here every pair of calls (fastvit then timm, or timm
then fastvit, alternating) runs within a few milliseconds, so a load change hits both sides of a pair; the median
of the pairs' ratios (and its quartiles) is what this machine's noise leaves. Wall-clock and process CPU time are
both reported (CPU time leaves out time the VM's neighbours took).

    python bench/paired.py                                  # tiny and mini, infer and train, bf16, CPU
    python bench/paired.py --model mini --mode infer --pairs 100
    python bench/paired.py --model vit_small_patch16_224 --mode infer --batch 1 --cast   # model.to(bf16), no autocast

fastvit's inference runs its last block on the class token alone, as bench/throughput.py's does
(``--no-class-token-inference``: every row, as timm's; measurements before 2026-12-06 ran every row).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastvit import ops  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def call(model, x, y, mode, dtype):
    """One forward (infer) or forward + backward (train) of ``model`` under autocast to ``dtype`` (None or fp32:
    none)."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype not in (None, torch.float32)):
        if mode == "infer":
            with torch.inference_mode():
                model(x)
            return
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()


def paired(name, mode, args, dtype):
    """Per clock: median and quartiles of timm's time / fastvit's over ``args.pairs`` interleaved pairs."""
    models = common.build_pair(name, backend=args.backend, seed=args.seed,
                               class_token_inference=args.class_token_inference)
    for m in models:
        m.train(mode == "train")
    gen = torch.Generator().manual_seed(args.seed)
    img = models[0].patch_embed.img_size
    x = torch.randn(args.batch, 3, *img, generator=gen)
    y = torch.randint(0, max(models[0].num_classes, 1), (args.batch,), generator=gen)
    if args.cast:  # the models and images in dtype, no autocast (a model deployed as model.to(torch.bfloat16))
        for m in models:
            m.to(dtype)
        x, dtype = x.to(dtype), None
    for _ in range(args.warmup):
        for m in models:
            call(m, x, y, mode, dtype)
    row = {"model": name, "mode": mode, "batch": args.batch, "pairs": args.pairs}
    for clock_name, clock in CLOCKS.items():
        ratios = []
        for i in range(args.pairs):
            took = {}
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                t0 = clock()
                call(models[side], x, y, mode, dtype)
                took[side] = clock() - t0
            ratios.append(took[1] / took[0])
        q1, median, q3 = statistics.quantiles(ratios, n=4)
        row[clock_name] = {"median": median, "q1": q1, "q3": q3}
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny,mini", help="comma list: tiny, mini or any bench/throughput.py name")
    p.add_argument("--mode", default="infer,train", help="comma list from infer, train")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--pairs", type=int, default=60)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--cast", action="store_true",
                   help="cast both models and the images to --dtype instead of autocasting to it")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="fastvit's kernels (CPU: the torch "
                                                                          "fallbacks)")
    common.add_class_token_inference_flag(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="output folder for paired.json")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    modes = common.choice_list(p, args.mode, ("infer", "train"), "mode")
    if args.pairs < 4 or args.batch < 1:
        p.error(f"--pairs must be >= 4 and --batch >= 1, got {args.pairs} and {args.batch}")
    out = common.out_dir(args.out, p)
    dtype = common.DTYPES[args.dtype]
    rows = []
    for name in common.model_list(p, args.model):
        for mode in modes:
            row = paired(name, mode, args, dtype)
            rows.append(row)
            print(f"{name:10s} {mode:5s} timm time / fastvit time, median [quartiles] over {args.pairs} pairs: "
                  + "  ".join(f"{c} {row[c]['median']:.3f} [{row[c]['q1']:.3f}, {row[c]['q3']:.3f}]"
                              for c in CLOCKS))
    path = os.path.join(out, "paired.json")
    common.write_result(path, {"dtype": args.dtype, "cast": args.cast, "rows": rows}, args, t_start)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
