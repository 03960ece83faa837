#!/usr/bin/env python
"""Training-loader throughput: decoded + augmented images/s of fastvit's data paths, next to the model's training
images/s, so one can see whether the loader keeps up (goal: at least 1.5x the model, per GPU).

Paths: ImageFolder files and WebDataset shards decoded, cropped and flipped in loader workers (uint8, normalised on
the device); shards decoded on the GPU (``--decode gpu``: workers read bytes, one batched nvjpeg call per
micro-batch, crop/flip/normalise on the GPU; CUDA only) and by NVIDIA DALI (``--decode dali``: one DALI pipeline
run per micro-batch decodes, crops, resizes, flips and normalises; CUDA and the [dali] extra). Each path runs the
trainer's own loader (``FileSource.loader`` over a ``micro_batch_plan``), so the numbers include reading,
decoding, the keyed random-resized-crop, flip, normalisation, collation and (GPU) the host-to-device copy.

    python bench/loader.py                                  # synthetic JPEGs (about ImageNet's size), all paths
    python bench/loader.py --data /data/imagenet --shards /data/imagenet-wds --workers 4,8,16 \\
        --throughput results/throughput.json                # the model's img/s from bench/throughput.py

Without --data, a synthetic ImageFolder of --images JPEGs (smooth scenes of 500 x 375 px on average, ~quality 90)
is written to a temporary folder and sharded with ``python -m fastvit.data.shards``'s writer. --throughput reads the
training images/s per GPU (fastvit, first train row) from a throughput.json; without it the model column is empty.
Writes loader.json and loader.png to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

TARGET = 1.5  # loader img/s over model img/s
PATHS = {"folder": "cpu", "shards": "cpu", "shards-gpu": "gpu", "shards-dali": "dali"}  # path -> --decode


def synthetic_folder(root, n, classes=10, seed=0):
    """``n`` JPEGs in ``classes`` class folders under root/train and a few under root/val: smooth colour fields
    with ellipses, sizes around ImageNet's mean (500 x 375), so the decoder sees natural-image-like entropy."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", max(classes, n // 10))):
        for i in range(count):
            w, h = int(rng.integers(350, 650)), int(rng.integers(260, 490))
            yy, xx = np.mgrid[0:h, 0:w]
            base = np.stack([np.sin(xx / rng.uniform(20, 90) + c) * np.cos(yy / rng.uniform(20, 90))
                             for c in range(3)], -1)
            image = Image.fromarray(((base + 1) * 110 + rng.uniform(0, 30)).clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(image)
            for _ in range(6):
                x0, y0 = rng.integers(0, w), rng.integers(0, h)
                draw.ellipse([x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 200)],
                             fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            folder = os.path.join(root, split, f"c{i % classes:03d}")
            os.makedirs(folder, exist_ok=True)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=90)
            with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
                f.write(out.getvalue())


def train_shards(spec):
    """The samples of --shards' training shards: a writer's output folder (its train/), a folder of .tar files or a
    brace pattern. The benchmark reads no held-out shards, which ShardSource would also want."""
    from fastvit.data.shards import ShardSamples, expand
    train = os.path.join(spec, "train")
    return ShardSamples(expand(train if os.path.isdir(train) else spec), desc="index train shards")


PREFETCH = 2  # batches each DataLoader worker prepares ahead (its prefetch_factor default)


def measure(source, batch, steps, warmup, seed=0):
    """(images/s, unreadable samples replaced) of ``source.loader`` over at least ``steps`` timed micro-batches after
    ``warmup`` ones (one rank). Replacing a sample costs a second read and decode: a count above 0 says the figure
    is not that of clean data.

    Workers fill their prefetch queues while the first batches are awaited: at the clock's start w workers hold
    up to 2 w finished batches, which a short window would count as free (16 workers over 8 batches read 60k img/s
    on the H200 machine's CPU, 7x its cores' decode rate). So the warm-up also takes those queued batches and the
    window is at least 8 w batches, where what is still queued is at most an eighth of it."""
    from fastvit.data import micro_batch_plan
    w = source.workers
    warmup, steps = warmup + PREFETCH * w, max(steps, 8 * w)
    total = warmup + steps
    plan = micro_batch_plan(source.sampler(seed), seed, 0, 0, total, batch, batch, 1, 0)
    batches = source.loader(plan, seed)
    bad = 0
    for _ in range(warmup):
        bad += len(next(batches)[2])
    if torch.cuda.is_available():  # the GPU paths' warm-up work ends before the clock starts
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        bad += len(next(batches)[2])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0), bad


def model_images_per_s(path):
    """(fastvit's training images/s per GPU, where it comes from) from a bench/throughput.py JSON (its first train
    row; the faster of eager and compiled when both were timed), or (None, None); ValueError naming the file where
    it is none."""
    if not path:
        return None, None
    try:
        data = json.loads(open(path).read())
        rows, world = data["rows"], data["world_size"]
        row = next((r for r in rows if r["mode"] == "train"), None)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--throughput {path}: not a readable throughput.json of bench/throughput.py "
                         f"({type(e).__name__}: {e})") from None
    if row is None:
        return None, None
    column = row.get("best", {}).get("fastvit", "fastvit")
    device = "GPU" if data.get("env", {}).get("cuda") else "CPU process"  # what one rank of that run trained on
    smoke = ", a smoke run of 32 px models" if data.get("smoke") else ""
    return row[column]["images_per_s"] / world, f"{row['model']} {column} per {device}{smoke} ({path})"


def plot(rows, model_ips, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
    xs = range(len(rows))
    ax.bar(xs, [r["images_per_s"] for r in rows], color=["C0" if r["decode"] == "cpu" else "C2" for r in rows])
    if model_ips:
        ax.axhline(model_ips, color="k", lw=1, label=f"model training img/s per rank ({model_ips:.0f})")
        ax.axhline(TARGET * model_ips, color="r", ls="--", lw=1, label=f"{TARGET}x the model")
        ax.legend(fontsize=8)
    ax.set_xticks(list(xs), [f"{r['path']}\n{r['workers']} workers" for r in rows], fontsize=8)
    ax.set_ylabel("decoded + augmented images / s")
    common.set_title(ax, title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="ImageFolder root with train/ (default: a synthetic one in a temporary folder)")
    p.add_argument("--shards", help="the same images as shards: the writer's output folder, a folder of .tar files or "
                                    "a brace pattern of training shards (default: written from --data with the writer)")
    p.add_argument("--images", type=int, default=512, help="synthetic training images (without --data)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="micro-batch (images per loader batch)")
    p.add_argument("--steps", type=int, default=8,
                   help="timed batches per measurement (at least 8 per loader worker: see measure)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches first (worker start-up)")
    p.add_argument("--workers", default=f"1,{os.cpu_count() or 1}", help="comma list of loader worker counts")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma list from {', '.join(PATHS)} (the GPU paths need CUDA, shards-dali also DALI; "
                        f"left out where they cannot run)")
    p.add_argument("--throughput", help="throughput.json of bench/throughput.py (the model's img/s)")
    p.add_argument("--out", default="results")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    paths = common.choice_list(p, args.paths, PATHS, "--paths")
    try:
        workers = [int(w) for w in common.split_list(args.workers)]
    except ValueError:
        p.error(f"--workers takes a comma list of worker counts such as 0,2,8, got {args.workers!r}")
    if not workers or min(workers) < 0:
        p.error(f"--workers takes worker counts of 0 or more, got {args.workers!r}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or args.images < 1 or args.img_size < 1:
        p.error("--steps, --batch, --images and --img-size must be at least 1, --warmup at least 0")
    try:
        model_ips, model_source = model_images_per_s(args.throughput)
    except ValueError as e:
        p.error(str(e))
    from fastvit.data.sources import decode_problem
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for path in [q for q in paths if PATHS[q] != "cpu"]:
        problem = decode_problem(PATHS[path], False, device)
        if problem:
            print(f"skipping the {path} path: {problem.replace('use --decode cpu', 'the folder and shards paths run')}")
            paths.remove(path)
    if not args.shards and importlib.util.find_spec("webdataset") is None:
        for path in [q for q in paths if q.startswith("shards")]:
            print(f"skipping the {path} path: writing the benchmark's shards needs the webdataset package "
                  "(pip install 'fastvit[shards]')")
            paths.remove(path)
    if not paths:
        p.error("none of the chosen --paths can run here: the folder and shards paths decode on the CPU")
    from fastvit.config import plural
    from fastvit.data import FileSource, ImageFolderSource
    from fastvit.data.shards import main as write_shards

    shards, shard_paths = None, any(q.startswith("shards") for q in paths)
    if args.shards and shard_paths:
        try:
            shards = train_shards(args.shards)
        except (ValueError, ImportError) as e:
            p.error(f"--shards: {e}")
    out = common.out_dir(args.out, p)  # after the checks: a usage error leaves no folder
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None and ("folder" in paths or shards is None):  # images to read, or to write as shards
            data = os.path.join(tmp, "images")
            synthetic_folder(data, args.images)
        if shards is None and shard_paths:
            folder = os.path.join(tmp, "shards")
            with contextlib.redirect_stdout(io.StringIO()):  # its summary names a folder deleted at the end
                write_shards([data, folder, "--shard-size", "64MB", "--no-verify"])
            shards = train_shards(folder)
        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
        rows = []
        result = {"title": f"loader throughput at {args.img_size} px, batch {args.batch}, {device_name}",
                  "img_size": args.img_size, "batch": args.batch, "synthetic": args.data is None, "rows": rows,
                  "model_images_per_s_per_gpu": model_ips, "model_source": model_source, "target_ratio": TARGET}
        for path in paths:
            for w in workers:
                try:
                    source = (ImageFolderSource(data, args.img_size, w, "cpu", device) if path == "folder" else
                              FileSource(shards, shards, args.img_size, w, PATHS[path], device))
                except ValueError as e:  # a --data that is no ImageFolder with train/ and val/
                    p.error(str(e))
                ips, bad = measure(source, args.batch, args.steps, args.warmup)
                rows.append({"path": path, "decode": source.decode, "workers": w, "images_per_s": ips,
                             "images_per_s_per_worker": ips / max(w, 1),
                             "ratio_to_model": ips / model_ips if model_ips else None, "bad_samples": bad})
                each = f"{ips / w:7.1f} per worker" if w else "in the main process"
                replaced = f"; {bad} unreadable sample(s) replaced, each read and decoded twice" if bad else ""
                print(f"{path:11s} {plural(w, 'worker'):>11s} {ips:9.1f} img/s ({each}{replaced})", flush=True)
                # rewritten after every row: a run stopped part-way (gpu_suite.sh's time limit) keeps what it measured
                common.write_result(out / "loader.json", result, args, t_start, complete=False)
    result = common.write_result(out / "loader.json", result, args, t_start)
    if model_ips:
        best = max(rows, key=lambda r: r["images_per_s"])
        verdict = "meets" if best["ratio_to_model"] >= TARGET else "misses"
        print(f"model trains at {model_ips:.0f} img/s ({model_source}); best loader {best['path']} with "
              f"{best['workers']} workers: {best['ratio_to_model']:.2f}x, {verdict} the {TARGET}x goal")
    plot(rows, model_ips, out / "loader.png", result["title"])
    print(f"wrote {out / 'loader.json'} and {out / 'loader.png'}")
    return result


if __name__ == "__main__":
    main()
