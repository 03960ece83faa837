#!/usr/bin/env python
"""Training and inference throughput of fastvit against timm, same settings, same run, alternating steps.

A step is one global batch (default 4096 = world size x micro-batch x accumulation steps): training runs the
forward and backward of every micro-batch (DDP gradient sync on the last one only) and one AdamW update; inference
runs the forward of every micro-batch. fastvit and timm models are built from the same weights and fed the same
batches, then their timed steps alternate (the order rotates every step) so that clock and thermal drift hit all.

Columns: ``fastvit`` and ``timm`` in eager mode; with --compile also ``fastvit_compile`` and ``timm_compile``,
torch.compile (``--compile-mode``) of a copy of each model with the same weights, so one run shows fastvit against
what a performance-minded timm user runs. ``ratio`` is the best fastvit column over the best timm column.

Printed and saved per model and mode: images/s (a global batch over the median timed step; every step's time is
saved, and a row whose steps varied over 1.5x says so), achieved TFLOP/s (FLOPs per image counted from the model
config by ``fastvit.flops``: 2 x the MACs of every matmul, attention included; training = 3 x forward; the same
count for every column, the whole model's, though fastvit's training step runs its last block on the class token alone
(``fastvit.model.class_token_suffices``) and so does its inference, where the logits then agree with the whole
computation to rounding (``set_class_token_inference``; ``--no-class-token-inference`` runs every row)), MFU against the
GPU's dense bf16 peak (``fastvit.flops.PEAK_TFLOPS``, or --peak-tflops), peak memory (GPU: the most memory
allocated while that model warmed up, above what was allocated before it was built, so it counts its weights,
gradients, optimizer state and activations), and fastvit/timm ratios.

Each row also says what fastvit ran (``backend_used``): ``fastvit ops`` ``triton`` (our kernels) or ``torch`` (the
fallback: CPU, or --backend torch), and ``attention``: ``flash`` (the flash-attn package), ``triton`` (our kernel;
``triton@i`` or ``triton@i/j`` a tuned tiling), ``sdpa_flash`` / ``sdpa_cudnn`` / ``sdpa_efficient`` (the SDPA
kernel --backend auto measured fastest), ``torch`` (SDPA, torch's own choice) or, for CPU training, ``fallback``
(SDPA's forward with our torch backward).

    python bench/throughput.py                                     # GPU: B/16, L/16, H/14; CPU: smoke config
    torchrun --nproc_per_node 8 bench/throughput.py --model B/16 --micro-batch 128
    python bench/throughput.py --model B/16 --compile --compile-mode max-autotune-no-cudagraphs

Without a GPU and without --model, a clearly labelled smoke configuration runs (small 32px models, few steps,
global batch 4096 by accumulation) in about 45 s on 2 idle cores with native bf16 GEMMs (minutes where timm's
bf16 GEMMs are emulated). DDP uses nccl on GPU and gloo on CPU; without
torchrun variables the script runs as a 1-rank group.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402

common.reexec_with_interpreter()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from fastvit import ops  # noqa: E402
from fastvit.flops import forward_flops, peak_flops  # noqa: E402
from fastvit.dist import distributed  # noqa: E402
from fastvit.model import class_token_suffices  # noqa: E402

GPU_MODELS = "B/16,L/16,H/14"
# Per-GPU micro-batches that fit an 80 GB GPU under bf16 autocast with both models resident.
GPU_MICRO_BATCH = {"vit_base_patch16_224": 256, "vit_large_patch16_224": 128, "vit_huge_patch14_224": 64}
# Fits well under 3 minutes on 2 idle CPU cores at the full global batch of 4096.
SMOKE = dict(models="tiny,mini", micro_batch=512, steps=3, warmup=1)  # 3 steps: a median that one slow step cannot set
MODES = ("train", "infer")
NOISY = 1.5  # slowest over fastest timed step of a column above which the row says the machine was noisy
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def columns(compiled):
    """The measured columns: eager fastvit and timm, plus both under torch.compile when ``compiled``."""
    return ("fastvit", "fastvit_compile", "timm", "timm_compile") if compiled else ("fastvit", "timm")


def backend_used(requested, model, device, dtype, micro_batch, training):
    """What fastvit's ops run here, as ``fastvit.ops`` decides it: the kernels' side for most ops, and attention's
    apart, asked with the model's own call shape (on a GPU with ``auto`` that is the measured choice, made here once
    and reused by the timed steps); and whether the last block ran on the class token alone or on every row."""
    main = "triton" if ops.use_triton(requested, torch.empty(0, device=device)) else "torch"
    # the first block's attention: its ``attn``, a ParallelThingsBlock's first branch's, a ParallelScalingBlock itself
    attn = next(m for m in model.blocks[0].modules() if hasattr(m, "attn_drop"))
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    q = torch.empty(micro_batch, attn.num_heads, tokens, attn.head_dim, device=device, dtype=dtype,
                    requires_grad=training)
    dropout = attn.attn_drop.p if training else 0.0
    one_row = ((training or model.class_token_inference) and model._class_token_only()
               and class_token_suffices(model.blocks[-1]))
    return {"ops": main, "attention": ops.attention_backend(q, backend=requested, dropout_p=dropout),
            "last_block": "class token" if one_row else "every row"}


def memory_allocated(device):
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class Runner:
    """One model (fastvit or timm) set up for one mode: DDP + AdamW for training, the bare module for inference."""

    def __init__(self, model, mode, device, dtype, accum, micro_batch, compile_mode, seed):
        """``compile_mode``: None for eager, else torch.compile's mode ('default' passes none)."""
        self.mode, self.device, self.dtype, self.accum = mode, device, dtype, accum
        model = model.to(device)
        if mode == "train":
            model.train()
            self.ddp = self.module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        else:
            model.eval()
            self.module = model
        if compile_mode is not None:
            self.module = torch.compile(self.module, mode=None if compile_mode == "default" else compile_mode)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        img = model.patch_embed.img_size
        self.x = torch.randn(micro_batch, 3, *img, generator=gen).to(device)
        num_classes = max(model.num_classes, 1)
        self.y = torch.randint(0, num_classes, (micro_batch,), generator=gen).to(device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self):
        """One global batch; returns after the device has finished it."""
        if self.mode == "train":
            for i in range(self.accum):
                ctx = self.ddp.no_sync() if i < self.accum - 1 else contextlib.nullcontext()
                with ctx:
                    with self._autocast():
                        loss = F.cross_entropy(self.module(self.x).float(), self.y) / self.accum
                    self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), self._autocast():
                for _ in range(self.accum):
                    self.module(self.x)
        common.sync(self.device)


def bench_model(name, mode, args, world, device, dtype, peak):
    """Build fastvit and timm on the same weights (and a copy of each to compile), warm each column up alone (peak
    memory), then time the columns' steps in rotating order."""
    # the table's micro-batch, made smaller where world size x micro-batch would exceed the global batch
    micro = args.micro_batch or min(GPU_MICRO_BATCH.get(common.canonical(name), 32), args.global_batch // world)
    if micro < 1 or args.global_batch % (world * micro):
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of world size x micro-batch = "
                         f"{world} x {micro}")
    accum = args.global_batch // (world * micro)
    ours, ref = common.build_pair(name, backend=args.backend, num_classes=args.num_classes, seed=args.seed,
                                  class_token_inference=args.class_token_inference)
    flops_fwd = forward_flops(ours)
    used = backend_used(args.backend, ours, device, dtype, micro, mode == "train")
    flops = flops_fwd * (3 if mode == "train" else 1)
    cols = columns(args.compile)
    # copies taken before any column trains, so that every column starts from the same weights
    models = {col: copy.deepcopy(ours if col.startswith("fastvit") else ref) if col.endswith("_compile")
              else (ours if col == "fastvit" else ref) for col in cols}
    runners, peak_mem = {}, {}
    for col in cols:
        before = memory_allocated(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runners[col] = Runner(models.pop(col), mode, device, dtype, accum, micro,
                              args.compile_mode if col.endswith("_compile") else None, args.seed)
        for _ in range(args.warmup):
            runners[col].step()
        peak_mem[col] = ((torch.cuda.max_memory_allocated(device) - before) / 2**30
                         if device.type == "cuda" else None)
    times = {col: [] for col in cols}
    for s in range(args.steps):
        for col in cols[s % len(cols):] + cols[:s % len(cols)]:
            dist.barrier()
            t0 = time.perf_counter()
            runners[col].step()
            times[col].append(time.perf_counter() - t0)
    row = {"model": name, "mode": mode, "micro_batch": micro, "accum_steps": accum,
           "global_batch": world * micro * accum, "flops_per_image": flops, "forward_gflops_per_image":
           flops_fwd / 1e9, "backend_used": used, "columns": list(cols)}
    for col in cols:
        # the slowest rank decides the step time (nccl reduces only device tensors)
        t = torch.tensor(times[col], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        steps = t.tolist()
        # the median step: one step slowed by the machine (another process, a page-cache miss) moved a mean of few
        # steps by 2-5x on a shared CPU
        ips = row["global_batch"] / statistics.median(steps)
        tflops = ips * flops / 1e12
        row[col] = {"images_per_s": ips, "tflops": tflops,
                    "mfu": tflops / (peak * world) if peak else None,
                    "peak_mem_gib": peak_mem[col], "step_seconds": steps, "step_spread": max(steps) / min(steps)}
    best = {impl: max((c for c in cols if c.startswith(impl)), key=lambda c: row[c]["images_per_s"])
            for impl in ("fastvit", "timm")}
    row["best"] = best
    row["ratio"] = row[best["fastvit"]]["images_per_s"] / row[best["timm"]]["images_per_s"]
    for col in cols:
        row[col]["ratio_vs_best_timm"] = row[col]["images_per_s"] / row[best["timm"]]["images_per_s"]
    row["ratio_peak_mem"] = (row["fastvit"]["peak_mem_gib"] / row["timm"]["peak_mem_gib"]
                             if device.type == "cuda" else None)
    del runners, models, ours, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help=f"comma list of models (default on GPU: {GPU_MODELS}); tiny, "
                                                 "mini, B/16, L/16, H/14 or any fastvit.list_models() name")
    p.add_argument("--mode", default="train,infer", help="comma list from train, infer")
    p.add_argument("--backend", default="auto", choices=ops.BACKENDS, help="fastvit's kernels")
    p.add_argument("--dtype", default="bf16", choices=list(common.DTYPES), help="autocast dtype (fp32: none)")
    p.add_argument("--compile", action="store_true",
                   help="add fastvit_compile and timm_compile columns: torch.compile of each model")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode for the compiled columns")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="the compiled columns replay CUDA graphs: --compile --compile-mode reduce-overhead (CUDA only)")
    common.add_class_token_inference_flag(p)
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=None, help="per rank (default: a per-model table)")
    p.add_argument("--steps", type=int, default=None, help="timed global-batch steps per model (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 2)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size (headless configs get one)")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU")
    p.add_argument("--smoke", action="store_true", help="the small CPU configuration, on any machine")
    p.add_argument("--interpret", action="store_true", help="re-run with TRITON_INTERPRET=1 (very slow)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="output folder for throughput.json and throughput.png")
    args = p.parse_args(argv)

    modes = common.choice_list(p, args.mode, MODES, "mode")
    if args.model is not None:
        common.model_list(p, args.model)
    if args.cuda_graphs:
        if not torch.cuda.is_available():
            p.error("--cuda-graphs needs a CUDA device; none is available here")
        if args.compile_mode not in ("default", "reduce-overhead"):
            p.error(f"--cuda-graphs is --compile-mode reduce-overhead; it cannot be combined with --compile-mode "
                    f"{args.compile_mode}")
        args.compile, args.compile_mode = True, "reduce-overhead"
    common.check_step_args(p, args)
    if args.warmup is not None and args.warmup < 1:
        p.error(f"--warmup must be at least 1, got {args.warmup}: the first step compiles and tunes kernels (and "
                f"the warm-up steps give the peak memory)")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        p.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    common.out_dir(args.out, p)  # run() writes there
    use_cuda = torch.cuda.is_available() and not args.smoke
    smoke = args.smoke or (not use_cuda and args.model is None)
    scaled = []
    if smoke:
        args.model = args.model or SMOKE["models"]
        args.micro_batch = args.micro_batch or min(SMOKE["micro_batch"], args.global_batch)
        args.steps = SMOKE["steps"] if args.steps is None else args.steps
        args.warmup = SMOKE["warmup"] if args.warmup is None else args.warmup
        args.num_classes = 10 if args.num_classes == 1000 else args.num_classes
        scaled = [f"models {args.model} instead of {GPU_MODELS} (tiny/mini: 32px images, widths 64/96)",
                  f"{args.steps} timed + {args.warmup} warm-up global-batch steps per model and mode",
                  f"micro-batch {args.micro_batch}, {args.num_classes} classes"]
        if args.global_batch != 4096:
            scaled.append(f"global batch {args.global_batch} instead of 4096")
    if args.micro_batch and args.global_batch % args.micro_batch:
        p.error(f"--global-batch {args.global_batch} must be a multiple of --micro-batch {args.micro_batch} (x the "
                f"world size under torchrun)")
    args.model = args.model or GPU_MODELS
    args.steps = 5 if args.steps is None else args.steps
    args.warmup = 2 if args.warmup is None else args.warmup
    if args.steps < 1:
        p.error("--steps must be at least 1")

    with distributed(device="cuda" if use_cuda else "cpu") as env:
        run(args, modes, smoke, scaled, env)


def run(args, modes, smoke, scaled, env):
    """Every model and mode on this rank of ``env``'s process group; rank 0 prints and writes the results."""
    rank, world, device = env.rank, env.world, env.device
    dtype = common.DTYPES[args.dtype]
    peak = peak_flops(device, args.peak_tflops)
    peak = peak and peak / 1e12
    if args.peak_tflops:
        peak_source = "--peak-tflops"
    elif peak:
        peak_source = f"{torch.cuda.get_device_name(device)} dense bf16"
    else:
        peak_source = "unknown (pass --peak-tflops)"
    say = print if rank == 0 else (lambda *a, **k: None)
    label = ("SMOKE CONFIGURATION (no GPU: scaled down, not a benchmark)" if smoke else f"{device.type.upper()} run") \
        + common.interpreter_note()
    compiled = f"compile {args.compile}" + (f" (mode {args.compile_mode})" if args.compile else "")
    say(f"== {label}: world {world}, global batch {args.global_batch}, {args.dtype}, backend {args.backend}, "
        f"{compiled}, " + (f"peak {peak} TFLOP/s ({peak_source})" if peak else f"peak {peak_source}"))
    for line in scaled:
        say(f"   scaled down: {line}")

    rows = []
    t_start = time.perf_counter()
    out = common.out_dir(args.out)

    def save(complete):
        """throughput.json with the rows so far (after every row, so that a run stopped by a time limit keeps
        what it measured); the chart at the end."""
        result = {"smoke": smoke, "label": label, "scaled_down": scaled, "world_size": world,
                  "device": str(device), "dtype": args.dtype, "backend": args.backend, "compile": args.compile,
                  "compile_mode": args.compile_mode if args.compile else None,
                  "columns": list(columns(args.compile)),
                  "global_batch": args.global_batch, "steps": args.steps, "warmup": args.warmup,
                  "peak_tflops": peak, "peak_source": peak_source, "rows": rows}
        result = common.write_result(out / "throughput.json", result, args, t_start, complete)
        if complete:
            common.bar_chart(rows, lambda r, col: r[col]["images_per_s"],
                             [f"{r['model']}\n{r['mode']}" for r in rows], "images / s", out / "throughput.png",
                             f"{label}\nworld {world}, global batch {args.global_batch}, {args.dtype}, "
                             "best fastvit / best timm ratio above bars", log_if_spread=True,
                             columns=columns(args.compile))
            say(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'} in {result['seconds']:.0f}s")

    for name in common.split_list(args.model):
        for mode in modes:
            say(f"{name:22s} {mode:5s} measuring {', '.join(columns(args.compile))} ({args.warmup} warm-up + "
                f"{args.steps} timed steps each)...", flush=True)
            r = bench_model(name, mode, args, world, device, dtype, peak)
            rows.append(r)
            for col in r["columns"]:
                v = r[col]
                mfu = f"{100 * v['mfu']:.1f}%" if v["mfu"] is not None else "n/a"
                mem = f"{v['peak_mem_gib']:.2f} GiB" if v["peak_mem_gib"] is not None else "n/a (CPU)"
                say(f"{name:22s} {mode:5s} {col:15s} {v['images_per_s']:10.1f} img/s {v['tflops']:8.3f} TFLOP/s "
                    f"MFU {mfu:>6s} peak mem {mem}  (micro {r['micro_batch']} x accum {r['accum_steps']})")
            used = r["backend_used"]
            say(f"{name:22s} {mode:5s} best fastvit / best timm images/s ratio {r['ratio']:.3f} "
                f"({r['best']['fastvit']} / {r['best']['timm']}; fastvit ops: {used['ops']}, "
                f"attention: {used['attention']}, last block: {used['last_block']})", flush=True)
            noisy = max(r["columns"], key=lambda col: r[col]["step_spread"])
            if r[noisy]["step_spread"] > NOISY:
                say(f"{name:22s} {mode:5s} steps varied up to {r[noisy]['step_spread']:.1f}x ({noisy}): a busy "
                    f"machine? images/s take the median step; bench/paired.py pairs the two sides for a steadier "
                    f"ratio", flush=True)
            if rank == 0:
                save(complete=False)
    if rank == 0:
        save(complete=True)

if __name__ == "__main__":
    main()
