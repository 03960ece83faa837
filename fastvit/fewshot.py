"""Few-shot linear evaluation of frozen features (the ViT paper's few-shot accuracy, big_vision's ``fewshot_lsr``).

Features (pre-logits) are standardised with the few-shot training set's mean and std (+1e-5), a constant bias
feature of 100 is appended (so the bias is almost unregularised), targets are 2·onehot−1, and the ridge solution
W = (XᵀX + λI)⁻¹XᵀY (or Xᵀ(XXᵀ + λI)⁻¹Y when there are fewer points than features) classifies by argmax.

    python -m fastvit.fewshot --init runs/digits/checkpoints/step_00000600 --shots 1 5 10 25 --seeds 3
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastvit.config import ARCH_FLAGS, cpus_per_local_rank, plural, short_warnings
from fastvit.data.sources import DataError, dataset_labels, eval_batches
from fastvit.model import POS_EMBED_AT, POS_EMBEDS

BIAS_CONSTANT = 100.0
SHOTS = (1, 5, 10, 25)


def _standardise(x, mean, std):
    x = (x - mean) / std
    return torch.cat([x, x.new_full((len(x), 1), BIAS_CONSTANT)], dim=1)


def lsr_weights(train_x, train_y, l2=1.0, num_classes=None):
    """Closed-form ridge regression from standardised features (+ bias) to 2·onehot−1 targets, in float64.

    Returns (W of shape (D + 1, K), mean, std) so that ``_standardise(x, mean, std) @ W`` are the class scores.
    """
    x = torch.as_tensor(train_x).double()
    y = torch.as_tensor(train_y).long()
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"expected features (N, D) and labels (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-5
    x = _standardise(x, mean, std)
    targets = 2.0 * F.one_hot(y, num_classes).double() - 1.0
    n, d = x.shape
    if n >= d:
        w = torch.linalg.solve(x.T @ x + l2 * torch.eye(d, dtype=x.dtype), x.T @ targets)
    else:
        w = x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(n, dtype=x.dtype), targets)
    return w, mean, std


def lsr_accuracy(train_x, train_y, test_x, test_y, l2=1.0) -> float:
    """Top-1 accuracy on (test_x, test_y) of the ridge classifier fitted on (train_x, train_y)."""
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    w, mean, std = lsr_weights(train_x, train_y, l2, num_classes)
    pred = (_standardise(torch.as_tensor(test_x).double(), mean, std) @ w).argmax(1)
    return (pred == test_y).double().mean().item()


@torch.no_grad()
def features(model, dataset, batch_size=256, workers=0):
    """Pre-logits features (N, D) of a dataset of (image, label) pairs, in float32 on the CPU, and the (N,) mask of
    images that could be read (an unreadable one comes with label -1, see ``fastvit.data.EvalImages``); ``workers``
    loader processes decode the images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out, readable = [], []
    for x, y, _ in eval_batches(dataset, batch_size, workers=workers, desc="features"):
        tokens = model.forward_features(x.to(device))
        out.append(model.forward_head(tokens, pre_logits=True).float().cpu())
        readable.append(torch.as_tensor(y) >= 0)
    model.train(was_training)
    return torch.cat(out), torch.cat(readable)


def sample_shots(labels, shots, seed):
    """Indices of ``shots`` examples per class (all of a class that has fewer), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    picked = [rng.choice(np.flatnonzero(labels == c), size=min(shots, int((labels == c).sum())), replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def evaluate(model, train_set, test_set, shots=SHOTS, seeds=3, l2=1.0, batch_size=256, workers=0):
    """Few-shot accuracy: for each shot count and each seed 0..seeds-1, fit the ridge classifier on that many
    examples per class of ``train_set`` and test on all of ``test_set``.

    Returns {shots: {"mean": m, "std": s (sample std over seeds), "accs": [per-seed accuracy]}}; only the sampled
    training images and the test set go through the model. Images that cannot be read are left out (with the
    dataset's warning). ``workers``: loader processes that decode the images.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    if not shots or any(int(k) < 1 for k in shots):
        raise ValueError(f"shots must be positive integers, got {shots}")
    labels = dataset_labels(train_set).numpy()
    counts = np.bincount(labels)
    for k in shots:
        short = np.flatnonzero(counts < int(k))
        if short.size:
            warnings.warn(f"{k}-shot: {short.size} of {counts.size} classes have fewer than {k} training images "
                          f"(the fewest {counts.min()}); those use all they have")
    picks = {(k, s): sample_shots(labels, int(k), s) for k in shots for s in range(seeds)}
    needed = np.unique(np.concatenate(list(picks.values())))
    train_feats, train_ok = features(model, torch.utils.data.Subset(train_set, needed.tolist()), batch_size, workers)
    row = {int(i): r for r, i in enumerate(needed)}
    test_x, test_ok = features(model, test_set, batch_size, workers)
    if not test_ok.any():
        raise DataError(f"none of the {len(test_ok)} held-out images could be read (each is named in a warning "
                        f"above): no few-shot accuracy")
    test_x, test_y = test_x[test_ok], dataset_labels(test_set)[test_ok]
    results = {}
    for k in shots:
        accs = []
        for s in range(seeds):
            picked = [int(i) for i in picks[(k, s)] if train_ok[row[int(i)]]]  # unreadable images left out
            if not picked:
                raise DataError(f"{k}-shot, draw {s}: none of its {len(picks[(k, s)])} training images could be "
                                f"read (each is named in a warning above)")
            rows = [row[i] for i in picked]
            accs.append(lsr_accuracy(train_feats[rows], torch.as_tensor(labels[picked]), test_x, test_y, l2))
        # the sample std over the draws (ddof 1, as --seeds and bench/ablation.py report theirs); 0 for one draw
        results[int(k)] = {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if seeds > 1 else 0.0,
                           "accs": accs}
    return results


def format_results(results) -> str:
    return "  ".join(f"{k}-shot {100 * r['mean']:.2f}" + (f" ± {100 * r['std']:.2f}" if len(r["accs"]) > 1 else "")
                     + "%" for k, r in results.items())


def run_data(init):
    """(--data, --val-data) of the training run ``init`` comes from (a checkpoint, its run folder, or the run's
    ``out/model``), from the run's config.json; None for anything else (a weights file, another model folder)."""
    if init is None:
        return None
    for folder in (Path(init), Path(init).parent):
        try:
            train = json.loads((folder / "config.json").read_text()).get("train")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(train, dict) and train.get("data"):
            return train["data"], train.get("val_data")
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastvit.fewshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="a training checkpoint (step folder, or a --out folder for its latest "
                                       "checkpoint) or a weights file for --model; omitted: random init")
    parser.add_argument("--model", help="model name (default: the checkpoint's, else vit_base_patch16_224)")
    parser.add_argument("--data", help="'digits', an ImageFolder root with train/ and val/, or WebDataset shards (a "
                                       "folder with train/ and val/); default: the data of the training run --init "
                                       "comes from, else digits")
    parser.add_argument("--val-data", help="held-out shards when --data is a shard pattern")
    parser.add_argument("--pos-embed", choices=POS_EMBEDS, help="position embedding of a random or weights-file "
                                                                "model (a checkpoint's own must match)")
    parser.add_argument("--pos-embed-at", choices=POS_EMBED_AT, help="where position tables are added (as above)")
    for flag in ("patch-size", "embed-dim", "depth", "num-heads"):
        parser.add_argument(f"--{flag}", type=int, help=f"{flag.replace('-', ' ')} of a random or weights-file model "
                                                        f"(a checkpoint's own must match)")
    parser.add_argument("--img-size", type=int, help="image size (default: the checkpoint's; for a weights file, the "
                                                     "size its position table was trained at)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS),
                        help=f"training images per class of each evaluation (default: {' '.join(map(str, SHOTS))})")
    parser.add_argument("--seeds", type=int, default=3, help="draws of the few-shot subsets per shot count "
                                                             "(default: 3; mean and std reported)")
    parser.add_argument("--l2", type=float, default=1.0, help="ridge regularisation (default: 1.0)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per feature batch (default: 256)")
    parser.add_argument("--workers", type=int, help="image loader processes (default: the usable CPUs, at most 4)")
    args = parser.parse_args(argv)
    if args.workers is None:  # more workers than CPUs only adds switching (and DataLoader's warning), as in train
        args.workers = min(4, cpus_per_local_rank(1))
    short_warnings()
    if args.seeds < 1 or min(args.shots) < 1:
        parser.error(f"--seeds and --shots must be positive integers, got --seeds {args.seeds} and --shots "
                     f"{' '.join(map(str, args.shots))}")
    # checked before the features are extracted (minutes on a large set), not after
    for flag, value, low in (("--l2", args.l2, 0), ("--batch-size", args.batch_size, 1), ("--workers", args.workers, 0),
                             ("--img-size", args.img_size, 1)):
        if value is not None and not value >= low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    from fastvit.data.choose import make_source
    from fastvit.restore import load_model_for_eval

    data_flags = (args.data, args.val_data)
    if args.data is None:
        run = run_data(args.init)
        data_flags = ("digits", args.val_data) if run is None else (run[0], args.val_data or run[1])
        if run is not None:
            print(f"few-shot on --data {run[0]}, the data the run {args.init} trained on (--data to change)")
    try:
        model, img_size = load_model_for_eval(args.init, args.model, args.img_size,
                                              **{k: getattr(args, k) for k in ARCH_FLAGS})
        print(f"few-shot features at {img_size}x{img_size} px" + ("" if args.img_size else " (--img-size to change)"))
        data = make_source(data_flags[0], img_size, workers=args.workers, val_data=data_flags[1])
        results = evaluate(model, data.train_eval, data.test, args.shots, args.seeds, args.l2, args.batch_size,
                           data.eval_workers(args.workers))
    except ValueError as e:
        parser.error(str(e))
    except DataError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"few-shot ({plural(args.seeds, 'seed')}, l2={args.l2}): {format_results(results)}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
