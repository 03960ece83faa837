#!/usr/bin/env python
"""Markdown tables from one results folder written by bench/gpu_suite.sh (the tables the README quotes).

Reads what is there of ``throughput_*/throughput.json``, ``profile.json``, ``numerics.json``, ``overhead.json``
(and ``overhead_cuda/overhead.json``, the real launches), ``loader.json``, ``residual_dtype.json``,
``ops_benchmark.json`` (pytest-benchmark) and ``autotune/autotune.json`` (the choices ``fastvit.autotune`` measured
during the runs) and writes ``summary.md`` beside them, headed by the date, GPU, torch and triton versions the files
record. Nothing is measured here.

    python bench/tables.py bench/results/nvidia-h200
    python bench/tables.py bench/results/nvidia-h200 --readme README.md   # and the README's GPU tables
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # after the standard library: see common.py
import common  # noqa: E402


def _load(path):
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _pct(v):
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _mode(row):
    """A row's mode, saying where fastvit's inference ran its last block on the class token alone (files written
    before bench/throughput.py recorded it ran every row)."""
    one_row = row["mode"] == "infer" and row.get("backend_used", {}).get("last_block") == "class token"
    return f"{row['mode']} (last block: class token)" if one_row else row["mode"]


def throughput_table(results):
    cols = ["fastvit", "fastvit_compile", "timm", "timm_compile"]
    header = ["model", "mode", "global batch", *[f"{c} img/s (MFU)" for c in cols], "best fastvit / best timm",
              "peak mem fastvit / timm (GiB)"]
    rows = []
    for data in results:
        for r in data["rows"]:
            cells = [r["model"], _mode(r), f"{r['micro_batch']} x {r['accum_steps']}"]
            for c in cols:
                cells.append(f"{r[c]['images_per_s']:.0f} ({_pct(r[c]['mfu'])})" if c in r else "—")
            mem = (f"{r['fastvit']['peak_mem_gib']:.1f} / {r['timm']['peak_mem_gib']:.1f}"
                   if r["fastvit"]["peak_mem_gib"] is not None else "n/a")
            cells += [f"{r['ratio']:.2f} ({r['best']['fastvit']} / {r['best']['timm']})", mem]
            rows.append(cells)
    return common.markdown_table(header, rows)


def profile_table(data):
    sides = list(data["sides"])
    header = ["category", *[f"{s} ms (%)" for s in sides]]
    rows = [[cat, *[f"{c['ms']:.1f} ({c['pct']:.1f}%)" for c in (data["sides"][s]["categories"][cat] for s in sides)]]
            for cat in data["categories"]]
    rows.append(["step", *[f"{data['sides'][s]['step_ms']:.1f}" for s in sides]])
    rows.append(["busy (some kernel running)", *[f"{data['sides'][s]['busy_ms']:.1f}" for s in sides]])
    if any("unlinked_ms" in data["sides"][s] for s in sides):  # profiles since kernels count once (profile.py)
        rows.append(["kernels linked to no CPU call",
                     *[f"{data['sides'][s].get('unlinked_ms', float('nan')):.1f}" for s in sides]])
    return common.markdown_table(header, rows)


def numerics_worst_table(data):
    """Per op or model, dtype and direction, the worst of fastvit's error over PyTorch's (max-abs and mean-rel,
    over every shape): the table the README quotes."""
    worst, names = {}, []
    for r in data["rows"]:
        names += [r["name"]] if r["name"] not in names else []
        key = (r["name"], r["dtype"], r["direction"])
        worst[key] = max(worst.get(key, 0.0), r["ratio_max_abs"], r["ratio_mean_rel"])
    cols = [(dtype, direction) for dtype in ("fp32", "fp16", "bf16") for direction in ("fwd", "bwd")]
    cols = [c for c in cols if any((n, *c) in worst for n in names)]
    return common.markdown_table(["op / model", *(f"{d} {di}" for d, di in cols)],
                                 [[n, *(f"{worst[(n, *c)]:.2f}" if (n, *c) in worst else "—" for c in cols)]
                                  for n in names])


def numerics_table(data):
    header = ["kind", "name", "shape", "dtype", "direction", "backend", "ratio max abs", "ratio mean rel", "ok"]
    rows = [[r["kind"], r["name"], r["shape"], r["dtype"], r["direction"], r["backend"],
             f"{r['ratio_max_abs']:.2f}", f"{r['ratio_mean_rel']:.2f}", "pass" if r["ok"] else "FAIL"]
            for r in data["rows"]]
    return common.markdown_table(header, rows)


def overhead_table(data):
    """Per op against the torch ops it replaces; then, where the file has them, the whole model against timm's."""
    table = common.markdown_table(["op", "direction", "fastvit us", "torch us", "ratio", "launches"],
                                  [[r["op"], r["direction"], f"{r['fastvit_us']:.1f}", f"{r['torch_us']:.1f}",
                                    f"{r['ratio']:.2f}", _count(r["kernel_launches"])] for r in data["ops"]])
    models = data.get("models")
    if not models:
        return table
    return table + "\n\n" + common.markdown_table(
        ["model", "direction", "fastvit us", "timm us", "ratio", "launches"],
        [[r["model"], r["direction"], f"{r['fastvit_us']:.1f}", f"{r['timm_us']:.1f}", f"{r['ratio']:.2f}",
          _count(r["kernel_launches"])] for r in models])


def _count(n):
    """A launch count, or "real" where the launches ran and were not counted (--device cuda)."""
    return "real" if n is None else n


def residual_dtype_table(data):
    rows = [[r["residual_dtype"], f"{r['saved_mib_per_image']:.1f}", f"{1e3 * r['step_s']:.1f}",
             f"{r['digits_top1_mean']:.1f}"] for r in data["rows"]]
    first = data["rows"][0]
    return common.markdown_table(
        ["residual dtype", f"{first['model']} MiB kept per image", f"{first['step_model']} step ms (micro "
         f"{first['micro_batch']})", f"digits top-1 % ({len(first['digits_top1'])} seeds)"], rows)


def ops_benchmark_table(data):
    """Median time per call of each op micro-benchmark group, fastvit beside torch (the median: a run without
    warm-up has a first call's compile and autotuning in its mean)."""
    groups = {}
    for b in data["benchmarks"]:
        if "impl" in b["params"]:
            groups.setdefault(b["group"], {})[b["params"]["impl"]] = b["stats"]["median"] * 1e6
    rows = [[g, f"{t.get('fastvit', float('nan')):.1f}", f"{t.get('torch', float('nan')):.1f}",
             f"{t['fastvit'] / t['torch']:.2f}" if {"fastvit", "torch"} <= set(t) else "—"]
            for g, t in sorted(groups.items())]
    return common.markdown_table(["op, direction, dtype", "fastvit us (median)", "torch us (median)", "ratio"], rows)


def attention_tiles_table(data):
    """Our attention's forward + backward per dK/dV tiling (``test_attention_backward_tiles``), each against the
    pre-Hopper tiling's time; None when the run has none (no GPU, or not a Hopper one for sm_90's)."""
    runs = {b["params"]["tiles"]: b for b in data["benchmarks"] if "tiles" in b["params"]}
    if not runs:
        return None
    base = runs["sm80"]["stats"]["median"] if "sm80" in runs else None
    rows = [[tiles, f"{b['stats']['median'] * 1e6:.1f}", f"{b['stats']['median'] / base:.2f}" if base else "—"]
            for tiles, b in runs.items()]
    return common.markdown_table([f"dK/dV tiles ({next(iter(runs.values()))['group']})", "fwd+bwd us (median)",
                                  "x sm80 tiles"], rows)


def loader_table(data):
    """Loader images/s per path and worker count, and their ratio to the model's training images/s per GPU."""
    return common.markdown_table(
        ["path", "decode", "workers", "images/s", "per worker", f"x model (goal >= {data['target_ratio']})"],
        [[r["path"], r["decode"], r["workers"], f"{r['images_per_s']:.0f}", f"{r['images_per_s_per_worker']:.0f}",
          "—" if r["ratio_to_model"] is None else f"{r['ratio_to_model']:.2f}"] for r in data["rows"]])


def autotune_table(data):
    """One row per measured choice: the op, the call it was measured for, the winner."""
    rows = []
    for key, winner in sorted(data.items()):
        op, fields, _ = json.loads(key)
        call = ", ".join(f"{name} {'/'.join(map(str, v)) if isinstance(v, list) else v}" for name, v in fields)
        rows.append([op, call, winner])
    return common.markdown_table(["op", "call", "fastest"], rows)


ENV_KEYS = ("gpu", "torch", "triton", "timm")


def caveats(data, env, what=""):
    """What a reader must know about one result file before quoting it: a run stopped part-way, a smoke or
    interpreter run (not a benchmark), or a file from another machine or version than the summary's header.
    ``what`` names the file's part of a table that several files fill (their models)."""
    notes = []
    if not data.get("complete", True):
        notes.append("**incomplete**: the run stopped part-way (a time limit), these are the rows it finished")
    if data.get("smoke"):
        notes.append("**smoke configuration**: scaled down, not a benchmark")
    its_env = data.get("env", {})
    if its_env.get("triton_interpret"):
        notes.append("**TRITON_INTERPRET=1**: the kernels ran in Triton's interpreter, times are not a benchmark")
    other = [f"{k} {its_env.get(k)}" for k in ENV_KEYS if its_env.get(k) != env.get(k)]
    if other:
        notes.append("measured with " + ", ".join(other) + " (not as in the header)")
    return [f"> {what}{n}" for n in notes] + ([""] if notes else [])


def throughput_sections(results, env, level="##"):
    """One section per distinct setting (dtype, backend, compile, world, peak): files of runs made with other
    flags are not described by one heading. Smaller models first."""
    results = sorted(results, key=lambda d: min((r.get("flops_per_image", 0) for r in d["rows"]), default=0))
    groups = {}
    for d in results:
        key = (d["dtype"], d["backend"], d["compile"], d["compile_mode"], d["world_size"], d["peak_tflops"],
               d["peak_source"])
        groups.setdefault(key, []).append(d)
    lines = []
    for (dtype, backend, compiled, mode, world, peak, source), group in groups.items():
        lines += [f"{level} Throughput (bench/throughput.py{' --compile' if compiled else ''})", "",
                  f"{dtype} autocast, backend {backend}, "
                  + (f"torch.compile mode {mode}" if compiled else "eager only (no torch.compile columns)")
                  + f", world {world}; "
                  + (f"MFU against {peak} TFLOP/s ({source}); " if peak else "no MFU (no peak known); ")
                  + "global batch = micro-batch x accumulation.", ""]
        for d in group:
            models = sorted({r["model"] for r in d["rows"]})
            lines += caveats(d, env, f"{', '.join(models)}: " if models else "")
        lines += [throughput_table(group), ""]
    return lines


def profile_section(profile, env, level="##"):
    if not profile:
        return []
    flag = f" --compile --compile-mode {profile['compile_mode']}" if profile["compile"] else ""
    return [f"{level} Training step by category (bench/profile.py --model {profile['model']}{flag})", "",
            f"{profile['time_source']} time per step, micro {profile['micro_batch']} x accum "
            f"{profile['accum_steps']}, {profile['dtype']}.", "", *caveats(profile, env), profile_table(profile), ""]


def _throughput_files(folder):
    """The throughput results of a folder: bench/gpu_suite.sh's ``throughput_*/`` sub-folders, and one that
    bench/throughput.py wrote into the folder itself."""
    paths = [folder / "throughput.json", *sorted(folder.glob("throughput_*/throughput.json"))]
    return [d for d in map(_load, paths) if d]


README_START = "<!-- bench/tables.py --readme: start (generated; do not edit) -->"
README_END = "<!-- bench/tables.py --readme: end -->"


def readme(folder, path):
    """Replace the README's generated block (between ``README_START`` and ``README_END``) with ``folder``'s
    throughput and profile tables, headed by where, when and with which versions they were measured."""
    folder, path = pathlib.Path(folder), pathlib.Path(path)
    throughput, profile = _throughput_files(folder), _load(folder / "profile.json")
    found = [d for d in (*throughput, profile) if d]
    if not found:
        raise SystemExit(f"no throughput or profile results in {folder}")
    env = found[0]["env"]
    dates = sorted({d["env"]["date"] for d in found if d["env"].get("date")})
    when = f"measured {', '.join(dates)}" if dates else f"tables written {datetime.date.today().isoformat()}"
    block = [README_START, "",
             f"From `{folder.as_posix()}/` ({when}; {env.get('gpu', 'no GPU')}, torch {env.get('torch')}, "
             f"triton {env.get('triton')}, timm {env.get('timm')}), by `python bench/tables.py {folder.as_posix()} "
             f"--readme {path.name}`; `summary.md` there has every table.", "",
             *throughput_sections(throughput, env, "####"), *profile_section(profile, env, "####"), README_END]
    text = path.read_text(encoding="utf-8")
    if text.count(README_START) != 1 or text.count(README_END) != 1 or text.index(README_START) > text.index(
            README_END):
        raise SystemExit(f"{path} needs one line {README_START!r} and, after it, one line {README_END!r}: the "
                         "generated tables go between them")
    head, rest = text.split(README_START)
    path.write_text(head + "\n".join(block) + rest.split(README_END, 1)[1], encoding="utf-8")
    return path


def summary(folder):
    folder = pathlib.Path(folder)
    throughput = _throughput_files(folder)
    profile, numerics, overhead = (_load(folder / f) for f in ("profile.json", "numerics.json", "overhead.json"))
    profile_compile = _load(folder / "profile_compile" / "profile.json")
    overhead_cuda = _load(folder / "overhead_cuda" / "overhead.json")
    ops_bench, loader = _load(folder / "ops_benchmark.json"), _load(folder / "loader.json")
    resid = _load(folder / "residual_dtype.json")
    choices = _load(folder / "autotune" / "autotune.json")
    found = [d for d in (*throughput, profile, profile_compile, numerics, overhead, overhead_cuda, loader, resid)
             if d]
    if not found and not ops_bench:
        raise SystemExit(f"no results in {folder}: it holds none of throughput.json (or throughput_*/), "
                         f"profile.json, numerics.json, overhead.json, ops_benchmark.json, loader.json, "
                         f"residual_dtype.json, as bench/gpu_suite.sh and the bench scripts write them")
    env = found[0].get("env", {}) if found else {}
    lines = [f"# fastvit results: {env.get('gpu', 'CPU only, no GPU')}", "",
             f"Written by bench/tables.py on {datetime.date.today().isoformat()} from the JSON in this folder "
             f"(bench/gpu_suite.sh); torch {env.get('torch')}, triton {env.get('triton')}, timm {env.get('timm')}.",
             ""]
    lines += throughput_sections(throughput, env)
    lines += profile_section(profile, env) + profile_section(profile_compile, env)
    if overhead_cuda:
        lines += ["## Host time per call on the GPU (bench/overhead.py --device cuda; real launches)", "",
                  *caveats(overhead_cuda, env), overhead_table(overhead_cuda), ""]
    if overhead:
        lines += ["## Host time per call (bench/overhead.py; this machine's CPU, launches stubbed)", "",
                  *caveats(overhead, env), overhead_table(overhead), ""]
    if ops_bench:
        lines += ["## Op micro-benchmarks (pytest bench/ --benchmark-only)", "", ops_benchmark_table(ops_bench), ""]
        tiles = attention_tiles_table(ops_bench)
        if tiles:
            lines += ["## Attention dK/dV tilings (bench/test_ops_benchmark.py)", "", tiles, ""]
    if loader:
        model = (f"the model trains at {loader['model_images_per_s_per_gpu']:.0f} images/s per GPU "
                 f"({loader['model_source']})" if loader["model_images_per_s_per_gpu"] else "no model figure")
        lines += [f"## Training loader (bench/loader.py): {loader['title']}; {model}", "", *caveats(loader, env),
                  loader_table(loader), ""]
    if resid:
        lines += ["## Residual stream dtype (bench/residual_dtype.py)", "", *caveats(resid, env),
                  residual_dtype_table(resid), ""]
    if choices:
        lines += ["## Measured choices (fastvit.autotune, during the runs above)", "", autotune_table(choices), ""]
    if numerics:
        lines += [f"## Numerics (bench/numerics.py): {numerics['failed']} of {len(numerics['rows'])} rows over "
                  f"{numerics['pass_ratio']}x PyTorch's own error", "", *caveats(numerics, env),
                  "The worst ratio per op, dtype and direction:", "", numerics_worst_table(numerics), "",
                  "Every row:", "", numerics_table(numerics), ""]
    out = folder / "summary.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a results folder, e.g. bench/results/nvidia-h200")
    p.add_argument("--readme", metavar="PATH",
                   help="also put the throughput and profile tables into PATH (README.md) between its two "
                        "'bench/tables.py --readme' marker lines")
    args = p.parse_args(argv)
    if not pathlib.Path(args.folder).is_dir():
        p.error(f"{args.folder} is not a folder (a results folder, e.g. bench/results/nvidia-h200)")
    if args.readme and not pathlib.Path(args.readme).is_file():
        p.error(f"--readme {args.readme} is not a file (the README to put the tables into)")
    print(f"wrote {summary(args.folder)}")
    if args.readme:
        print(f"wrote the tables into {readme(args.folder, args.readme)}")


if __name__ == "__main__":
    main()
