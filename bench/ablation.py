#!/usr/bin/env python
"""The paper's position-embedding ablation (Table 8) from the command line: every variant x placement is trained
with fastvit.train, then scored by 5-shot linear accuracy of its frozen features (``fastvit.fewshot``, ridge on
standardised pre-logits, as big_vision's few-shot evaluator), mean ± std over --seeds, beside the paper's numbers
(ViT-B/16 pre-trained on ImageNet, 5-shot linear ImageNet accuracy).

    python bench/ablation.py                                   # digits, 3 seeds, 200 steps per run (minutes)
    python bench/ablation.py --seeds 1 --steps 20 --embed-dim 32 --depth 2   # smoke
    python bench/ablation.py --data /data/imagenet --model vit_base_patch16_224 --epochs 30 --seeds 1

Every flag the ablation does not define is a ``python -m fastvit.train`` flag, passed to each run (--data, --steps,
--model, --lr, ...). Writes ablation.json (per run: variant, placement, seed, held-out top-1, 5-shot accuracy) and
ablation.png (ours beside the paper's, per variant and placement) to --out, and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import numpy as np  # noqa: E402

# Table 8 of the paper: (pos_embed, pos_embed_at) -> 5-shot linear ImageNet accuracy of ViT-B/16
PAPER = {("none", "stem"): 0.61382, ("learn", "stem"): 0.64206, ("learn", "every_layer"): 0.63964,
         ("learn", "every_layer_shared"): 0.64292, ("learn_2d", "stem"): 0.64001, ("learn_2d", "every_layer"): 0.64046,
         ("learn_2d", "every_layer_shared"): 0.64022, ("rel", "stem"): 0.64032}
# "rel" is a per-head bias over 2-D offsets (BEiT's form), the paper's a 1-D relative attention (its Appendix D.4)
NAMES = {"none": "no pos. emb.", "learn": "1-D", "learn_2d": "2-D", "rel": "relative (2-D bias)"}
SHOTS = 5
DIGITS_STEPS = 200  # per run with --data digits, unless --steps/--epochs are passed


class Stopped(Exception):
    """A run's training ended by a stop request; ``result`` is what ``fastvit.train.train`` returned."""

    def __init__(self, result):
        super().__init__(result["signal"])
        self.result = result


SETTINGS_FILE = "settings.json"
# trainer flags that change no run's numbers (where files go, how often they are written, how work is spread)
_FREE_FLAGS = ("out", "resume", "keep", "save_every", "eval_every", "workers", "threads", "dist_timeout", "fewshot",
               "peak_tflops")


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_runs(cfg, pairs):
    """Every run's flags checked as the trainer checks them, and every variant's model built on the meta device
    (no memory), before the first run trains: a flag a variant cannot take (learn_2d with an odd --embed-dim, a
    --steps of 0) was found only when its turn came, after the runs before it. Raises ValueError."""
    import torch

    import fastvit
    from fastvit.config import check, resolve
    from fastvit.train import model_kwargs
    for variant, placement in pairs:
        run_cfg, _ = resolve(dataclasses.replace(cfg, pos_embed=variant, pos_embed_at=placement), _world())
        check(run_cfg, _world())
        if not run_cfg.init:  # from a checkpoint the run checks its architecture against it
            with torch.device("meta"):
                try:
                    fastvit.create_model(run_cfg.model, **model_kwargs(run_cfg, 10))
                except ValueError as e:
                    raise ValueError(f"--variants {variant}:{placement}: {e}") from None


def check_same_settings(runs_dir, cfg):
    """Record the trainer settings the runs in ``runs_dir`` use, or refuse others: a rerun resumes the runs found
    there, and with another --steps or --lr they would go on under a schedule they did not start with. Settings as
    the trainer resolves them (a flag at its preset value is no change); a folder that holds no run yet takes the
    new settings."""
    import json
    from fastvit.config import resolve
    resolved, _ = resolve(cfg, _world())
    settings = {k: v for k, v in dataclasses.asdict(resolved).items() if k not in _FREE_FLAGS}
    path = runs_dir / SETTINGS_FILE
    runs = [p for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else []
    if path.exists() and runs:
        stored = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {stored.get(k)} -> {v}" for k, v in settings.items() if stored.get(k) != v]
        # a folder written before settings were stored resolved holds the flags as given
        given = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_FLAGS}
        if changed and any(stored.get(k) != v for k, v in given.items()):
            raise ValueError(f"{runs_dir} holds ablation runs trained with other settings ({', '.join(changed)}); "
                             f"rerun with their flags to resume them, or pass another --out")
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(path, settings)


def earlier_runs(path, jobs, fewshot_seeds) -> tuple[list, list]:
    """(kept, dropped): the runs an earlier ablation in the same --out recorded (``path``: its ablation.json) for
    (variant, placement, seed) not among ``jobs``: a rerun with a subset of --variants (or fewer --seeds) adds to the
    table instead of replacing it. Kept only where they were scored alike (the same --fewshot-seeds; the trainer
    settings are the same, :func:`check_same_settings`), else dropped."""
    import json
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], []
    if not isinstance(data, dict):
        return [], []
    asked = set(jobs)
    others = [r for r in data.get("runs", []) if (r["variant"], r["placement"], r["seed"]) not in asked]
    return (others, []) if data.get("fewshot_seeds") == fewshot_seeds else ([], others)


def run_variant(cfg, variant, placement, seed, out, fewshot_seeds):
    """Train one variant with one seed; returns its held-out top-1 and 5-shot linear accuracy. Raises
    :class:`Stopped` where a stop request (Ctrl-C, SIGTERM) ended the training (its checkpoint saved)."""
    from fastvit import fewshot
    from fastvit.data import make_source
    from fastvit.restore import load_model_for_eval
    from fastvit.train import train

    run_cfg = dataclasses.replace(cfg, pos_embed=variant, pos_embed_at=placement, seed=seed, seeds=1,
                                  out=os.path.join(out, f"{variant}-{placement}-seed{seed}"), fewshot=False)
    result = train(run_cfg, resume_hint="")  # the ablation says how to resume it (its own --out), not the run
    if result["stopped_by_signal"]:
        raise Stopped(result)
    model, img_size = load_model_for_eval(run_cfg.out)
    data = make_source(run_cfg.data, img_size, workers=run_cfg.workers, val_data=run_cfg.val_data)
    shots = fewshot.evaluate(model, data.train_eval, data.test, shots=(SHOTS,), seeds=fewshot_seeds)[SHOTS]
    return {"variant": variant, "placement": placement, "seed": seed, "top1": result["top1"],
            "fewshot5": shots["mean"], "fewshot5_per_draw": shots["accs"]}


def summarise(runs):
    """Per (variant, placement): mean and std over seeds of the 5-shot accuracy, and the paper's value."""
    table = []
    for key, paper in PAPER.items():
        accs = [r["fewshot5"] for r in runs if (r["variant"], r["placement"]) == key]
        if accs:
            table.append({"variant": key[0], "placement": key[1], "mean": float(np.mean(accs)),
                          "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else None, "seeds": len(accs),
                          "paper": paper})
    return table


def title_of(data_name, table, cfg):
    """The table's title, with the seeds its rows average (a rerun may keep rows of more seeds than it ran)."""
    counts = sorted({r["seeds"] for r in table}) or [0]
    seeds = f"{counts[0]} seed(s)" if len(counts) == 1 else f"{counts[0]}-{counts[-1]} seeds per row"
    return (f"5-shot linear accuracy by position embedding: {data_name}, {seeds}, "
            f"{cfg.steps or cfg.epochs} {'steps' if cfg.steps else 'epochs'} per run")


def save(out, result, runs, args, t0, data_name, cfg, complete):
    """ablation.json and ablation.png of the runs so far (after every run: a crash or Ctrl-C keeps what was
    scored, and the figure never shows an older ablation than the file)."""
    table = summarise(runs)
    title = title_of(data_name, table, cfg)
    result = common.write_result(out / "ablation.json", {**result, "title": title, "runs": runs, "table": table},
                                 args, t0, complete=complete)
    plot(table, out / "ablation.png", title + ("" if complete else " (incomplete)"))
    return result, table, title


def plot(table, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{NAMES[r['variant']]}\n{r['placement']}" for r in table]
    xs = np.arange(len(table))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(table)), 4))
    spread = any(r["std"] is not None for r in table)  # no error bars (and no flat caps) for one seed
    ax.bar(xs - 0.2, [100 * r["mean"] for r in table], 0.4,
           yerr=[100 * (r["std"] or 0) for r in table] if spread else None, capsize=3,
           label="fastvit (this run" + (", ± std over seeds)" if spread else ")"))
    ax.bar(xs + 0.2, [100 * r["paper"] for r in table], 0.4, label="paper (ViT-B/16, ImageNet)")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("5-shot linear accuracy (%)")
    common.set_title(ax, title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)  # below: bars reach 100%
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Any other flag is passed to python -m fastvit.train.")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per variant (default: 3)")
    parser.add_argument("--fewshot-seeds", type=int, default=3,
                        help="random 5-shot draws per trained model (default: 3)")
    parser.add_argument("--variants", default=",".join(f"{v}:{p}" for v, p in PAPER),
                        help="comma list of pos_embed:pos_embed_at pairs (default: all of Table 8)")
    parser.add_argument("--out", default="results", help="folder for ablation.json / .png and the run folders")
    args, rest = parser.parse_known_args(argv)
    items = common.split_list(args.variants)
    if not items:
        parser.error(f"--variants names no pair; choose from {[f'{v}:{p}' for v, p in PAPER]}")
    pairs = list(dict.fromkeys(tuple(item.split(":", 1)) for item in items))  # a repeated variant runs once
    unknown = [":".join(pair) for pair in pairs if pair not in PAPER]
    if unknown:
        parser.error(f"--variants: {unknown} are not in Table 8; choose from {[f'{v}:{p}' for v, p in PAPER]}")
    if args.seeds < 1 or args.fewshot_seeds < 1:
        parser.error("--seeds and --fewshot-seeds must be at least 1")
    from fastvit.config import TrainConfig, build_parser
    train_parser = build_parser()
    cfg = TrainConfig(**vars(train_parser.parse_args(rest)))
    if cfg.pos_embed is not None or cfg.pos_embed_at is not None:
        parser.error("--pos-embed and --pos-embed-at are what the ablation varies: choose the variants with "
                     "--variants pos_embed:pos_embed_at,... (e.g. --variants none:stem)")
    if cfg.data == "digits" and cfg.steps is None and cfg.epochs is None:
        cfg = dataclasses.replace(cfg, steps=DIGITS_STEPS)
    try:
        check_runs(cfg, pairs)
    except ValueError as e:
        parser.error(str(e))
    out = common.out_dir(args.out, parser)
    try:
        check_same_settings(out / "ablation_runs", cfg)
    except ValueError as e:
        parser.error(str(e))
    runs, t0 = [], time.perf_counter()
    from fastvit.data import progress
    from fastvit.train import stop_status
    data_name = "digits" if cfg.data == "digits" else cfg.data
    result = {"train_config": dataclasses.asdict(cfg), "seeds": args.seeds, "fewshot_seeds": args.fewshot_seeds,
              "shots": SHOTS}
    jobs = [(v, p, cfg.seed + s) for v, p in pairs for s in range(args.seeds)]
    earlier, dropped = earlier_runs(out / "ablation.json", jobs, args.fewshot_seeds)
    if dropped:
        print(f"dropping {len(dropped)} earlier run(s) of variants or seeds not asked for now from "
              f"{out / 'ablation.json'}: they were scored with another --fewshot-seeds (rerun them to add them back)")
    lines_above = contextlib.nullcontext()
    if sys.stderr.isatty():  # the runs' own lines (the trainer's, few-shot's) print above the bar, not over it
        from tqdm.contrib import DummyTqdmFile
        lines_above = contextlib.redirect_stdout(DummyTqdmFile(sys.stdout))
    with lines_above:
        for variant, placement, seed in progress(jobs, desc="ablation", unit="run"):
            stopped, status, error = None, 0, None
            try:
                runs.append(run_variant(cfg, variant, placement, seed, str(out / "ablation_runs"), args.fewshot_seeds))
            except Stopped as stop:  # in training: its checkpoint saved
                stopped, status = "its checkpoint saved", stop_status(stop.result)
            except KeyboardInterrupt:  # outside training (loading, few-shot), or a second Ctrl-C
                stopped, status = "interrupted (its last checkpoint kept)", 130
            except ValueError as e:  # a setting only this run finds wrong (an --init of another variant)
                error = e
            save(out, result, earlier + runs, args, t0, data_name, cfg, complete=False)
            if error is not None:
                parser.exit(2, f"{parser.prog}: error: {variant}:{placement} seed {seed}: {error} ({len(runs)} of "
                               f"{len(jobs)} runs done, in {out / 'ablation.json'})\n")
            if stopped:
                print(f"stopped during {variant}:{placement} seed {seed}, {stopped}; the same bench/ablation.py "
                      f"command (same --out {args.out}) resumes the ablation there ({len(runs)} of {len(jobs)} runs "
                      f"done, in {out / 'ablation.json'})", file=sys.stderr, flush=True)
                sys.exit(status)
    if earlier:
        print(f"kept {len(earlier)} earlier run(s) of variants or seeds not asked for now, from "
              f"{out / 'ablation.json'} (same settings)")
    result, table, title = save(out, result, earlier + runs, args, t0, data_name, cfg, complete=True)
    rows = [[NAMES[r["variant"]], r["placement"], f"{100 * r['mean']:.2f}" + (
        f" ± {100 * r['std']:.2f}" if r["seeds"] > 1 else ""), str(r["seeds"]), f"{100 * r['paper']:.2f}"]
        for r in table]
    print(f"\n{title}\n" + common.markdown_table(["position embedding", "placement", "fastvit 5-shot %", "seeds",
                                                   "paper 5-shot % (ViT-B/16, ImageNet)"], rows))
    print(f"fastvit: this run's model ({cfg.model or 'the preset ViT'}) trained and scored on {data_name}; the paper: "
          f"ViT-B/16 on ImageNet. Compare the order of the variants, not the values.")
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
