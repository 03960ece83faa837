#!/usr/bin/env python
"""Training activation memory per image, fastvit vs timm: what autograd saves for backward.

On CPU (always): one training forward under bf16 autocast at a small batch, counting the unique storages that
autograd saves (``torch.autograd.graph.saved_tensors_hooks``, see ``fastvit.memory``). Parameters and the copies
autocast makes of them (bf16 weights) are weights, not activations, and are excluded. The script still reports
those copies (``weight_copies_mib``, per step) and activations plus copies per image
(``with_weight_copies_mib_per_image``): that is the counting behind the 145.6 MiB/img sometimes quoted for timm
B/16 (batch 2, 165 MiB of bf16 weight copies shared by 2 images), a figure that changes with the batch (228 at
batch 1, 84 at batch 8) while the activations stay at 63.3 MiB/img. fastvit's torch fallbacks save what its
kernels save, so the CPU count speaks for the GPU path.

On a GPU (when there is one): the memory a forward leaves allocated for backward, per image, and the peak of a
forward + backward step at ``--gpu-batch``.

    python bench/memory.py                               # B/16, L/16, H/14 -> results/memory.json, memory.png
    python bench/memory.py --models B/16 --batch 2
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

common.reexec_with_interpreter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastvit import ops  # noqa: E402
from fastvit.flops import vit_config  # noqa: E402
from fastvit.memory import saved_activation_bytes  # noqa: E402

MIB = 2**20


def count_cpu(name, impl, batch, dtype, backend, seed):
    """Saved bytes for one training forward on CPU, as MiB per image, plus the model's sizes."""
    model = common.build_model(name, impl, backend=backend, seed=seed)
    cfg = vit_config(model)
    x = torch.randn(batch, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    saved = saved_activation_bytes(model, x, dtype=dtype, details=True)
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    tokens = cfg["num_patches"] + cfg["prefix_tokens"]
    act = saved.activation_bytes / batch
    return cfg, {"activation_mib_per_image": act / MIB,
                 "with_weight_copies_mib_per_image": (saved.activation_bytes + saved.weight_bytes) / batch / MIB,
                 "weight_copies_mib": saved.weight_bytes / MIB,
                 # in units of D values of 2 bytes per token per block, the unit of the block-design arithmetic
                 "bf16_d_values_per_token_per_block": act / (cfg["depth"] * tokens * cfg["embed_dim"] * 2),
                 "seconds": seconds}


def measure_gpu(name, impl, batch, dtype, backend, seed):
    """(forward-retained MiB per image, peak GiB of forward + backward) on the GPU, above the model's weights."""
    device = torch.device("cuda")
    model = common.build_model(name, impl, backend=backend, seed=seed).to(device).train()
    x = torch.randn(batch, 3, *model.patch_embed.img_size, device=device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        out = model(x)
    torch.cuda.synchronize()
    retained = torch.cuda.memory_allocated() - before
    F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del model, x, out
    gc.collect()
    torch.cuda.empty_cache()
    return {"gpu_batch": batch, "gpu_forward_retained_mib_per_image": retained / batch / MIB,
            "gpu_step_peak_gib": peak / 2**30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="B/16,L/16,H/14", help="comma list: B/16, L/16, H/14, tiny, mini or a "
                                                               "fastvit.list_models() name")
    p.add_argument("--batch", type=int, default=1, help="CPU batch for the count (1 or 2 is enough: it is linear)")
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="fastvit's kernels")
    p.add_argument("--gpu-batch", type=int, default=32, help="batch of the GPU measurement (GPU only)")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU measurement even with a GPU")
    p.add_argument("--interpret", action="store_true", help="re-run with TRITON_INTERPRET=1 (very slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="output folder for memory.json and memory.png")
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    out = common.out_dir(args.out, p)
    dtype = None if args.dtype == "fp32" else common.DTYPES[args.dtype]
    use_gpu = torch.cuda.is_available() and not args.no_gpu

    names = common.model_list(p, args.models)
    rows = []
    t_start = time.perf_counter()
    for name in names:
        row = {"model": name}
        for impl in ("fastvit", "timm"):
            cfg, row[impl] = count_cpu(name, impl, args.batch, dtype, args.backend, args.seed)
            if use_gpu:
                row[impl].update(measure_gpu(name, impl, args.gpu_batch, dtype or torch.float32, args.backend,
                                             args.seed))
        row["config"] = cfg
        row["ratio"] = row["fastvit"]["activation_mib_per_image"] / row["timm"]["activation_mib_per_image"]
        if use_gpu:
            row["gpu_ratio_peak"] = row["fastvit"]["gpu_step_peak_gib"] / row["timm"]["gpu_step_peak_gib"]
        rows.append(row)
        f, t = row["fastvit"], row["timm"]
        line = (f"{name:22s} fastvit {f['activation_mib_per_image']:8.1f} MiB/img "
                f"({f['bf16_d_values_per_token_per_block']:.1f} x D bf16 values / token / block)  timm "
                f"{t['activation_mib_per_image']:8.1f} MiB/img ({t['bf16_d_values_per_token_per_block']:.1f})  "
                f"ratio {row['ratio']:.3f}")
        if use_gpu:
            line += f"  GPU peak {f['gpu_step_peak_gib']:.2f} vs {t['gpu_step_peak_gib']:.2f} GiB"
        print(line, flush=True)

    backend_used = "triton" if ops.use_triton(args.backend, torch.empty(0)) else "torch"
    result = {"dtype": args.dtype, "autocast": dtype is not None, "batch": args.batch,
              "method": "unique storages saved by autograd on CPU during one training forward, parameters and "
                        "their autocast copies excluded",
              "cpu_backend_used": backend_used, "rows": rows}
    result = common.write_result(out / "memory.json", result, args, t_start)
    common.bar_chart(rows, lambda r, impl: r[impl]["activation_mib_per_image"], [r["model"] for r in rows],
                     "saved activations, MiB / image", out / "memory.png",
                     f"saved activations per image, training, {args.dtype} autocast, batch {args.batch}\n"
                     "fastvit/timm ratio above bars")
    print(f"wrote {out / 'memory.json'} and {out / 'memory.png'} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
