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


def check_same_settings(runs_dir, cfg):
    """Record the trainer settings the runs in ``runs_dir`` use, or refuse others: a rerun resumes the runs found
    there, and with another --steps or --lr they would go on under a schedule they did not start with."""
    import json
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_FLAGS}
    path = runs_dir / SETTINGS_FILE
    if path.exists():
        stored = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {stored.get(k)} -> {v}" for k, v in settings.items() if stored.get(k) != v]
        if changed:
            raise ValueError(f"{runs_dir} holds ablation runs trained with other settings ({', '.join(changed)}); "
                             f"rerun with their flags to resume them, or pass another --out")
        return
    runs_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(path, settings)


def earlier_runs(path, jobs, fewshot_seeds) -> list:
    """The runs an earlier ablation in the same --out recorded (``path``: its ablation.json) for (variant,
    placement, seed) not among ``jobs``: a rerun with a subset of --variants (or fewer --seeds) adds to the table
    instead of replacing it. Only where they were scored alike (the same --fewshot-seeds; the trainer settings are
    the same, :func:`check_same_settings`)."""
    import json
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("fewshot_seeds") != fewshot_seeds:
        return []
    asked = set(jobs)
    return [r for r in data.get("runs", []) if (r["variant"], r["placement"], r["seed"]) not in asked]


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
    out = common.out_dir(args.out, parser)
    try:
        check_same_settings(out / "ablation_runs", cfg)
    except ValueError as e:
        parser.error(str(e))
    runs, t0 = [], time.perf_counter()
    from fastvit.data import progress
    from fastvit.train import stop_status
    data_name = "digits" if cfg.data == "digits" else cfg.data
    title = (f"5-shot linear accuracy by position embedding: {data_name}, {args.seeds} seed(s), "
             f"{cfg.steps or cfg.epochs} {'steps' if cfg.steps else 'epochs'} per run")
    result = {"title": title, "train_config": dataclasses.asdict(cfg), "seeds": args.seeds,
              "fewshot_seeds": args.fewshot_seeds, "shots": SHOTS}
    jobs = [(v, p, cfg.seed + s) for v, p in pairs for s in range(args.seeds)]
    earlier = earlier_runs(out / "ablation.json", jobs, args.fewshot_seeds)
    for variant, placement, seed in progress(jobs, desc="ablation", unit="run"):
        try:
            runs.append(run_variant(cfg, variant, placement, seed, str(out / "ablation_runs"), args.fewshot_seeds))
        except Stopped as stop:  # the finished runs are kept, the file says it is incomplete, no table
            common.write_result(out / "ablation.json", {**result, "runs": earlier + runs, "table": []}, args, t0,
                                complete=False)
            print(f"stopped during {variant}:{placement} seed {seed}, its checkpoint saved; the same bench/ablation.py "
                  f"command (same --out {args.out}) resumes the ablation there ({len(runs)} of {len(jobs)} runs "
                  f"done, in {out / 'ablation.json'})", file=sys.stderr, flush=True)
            sys.exit(stop_status(stop.result))
    if earlier:
        print(f"kept {len(earlier)} earlier run(s) of variants or seeds not asked for now, from {out / 'ablation.json'} "
              f"(same settings)")
    runs = earlier + runs
    table = summarise(runs)
    rows = [[NAMES[r["variant"]], r["placement"], f"{100 * r['mean']:.2f}" + (
        f" ± {100 * r['std']:.2f}" if r["seeds"] > 1 else ""), f"{100 * r['paper']:.2f}"] for r in table]
    print(f"\n{title}\n" + common.markdown_table(["position embedding", "placement", "fastvit 5-shot %",
                                                   "paper 5-shot % (ViT-B/16, ImageNet)"], rows))
    result = common.write_result(out / "ablation.json", {**result, "runs": runs, "table": table}, args, t0)
    plot(table, out / "ablation.png", title)
    print(f"wrote {out / 'ablation.json'} and {out / 'ablation.png'} in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
