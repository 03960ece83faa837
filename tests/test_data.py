"""fastvit.data on files: keyed augmentation against torchvision's ops, the GPU path's code on CPU tensors against the
CPU path, unreadable samples (replaced, counted, a limit), and training on an ImageFolder with broken files."""
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvit import checkpoint, fewshot
from fastvit.config import TrainConfig
from fastvit.data import (BadSampleWarning, DataError, FileSource, FolderSamples, ImageFolderSource, augment_batch,
                          crop_boxes, decode_image, decode_pil, eval_transform, keyed_uniform, make_source,
                          micro_batch_plan, mix_seed)
from fastvit.data.augment import EVAL_CFG, UNIFORMS
from fastvit.data.gpu import GpuDecoder
from fastvit.data.sources import collate
from fastvit.train import main, train

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, threads=1, workers=0, warmup_steps=1,
            dropout=0.0, eval_every=100)
SIZES = [(24, 20), (40, 31), (17, 60), (33, 33)]  # mixed image sizes, both orientations


def encode(pixels, fmt):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_folder(root, per_class=6, classes=("cat", "dog", "owl"), broken=(), seed=0):
    """An ImageFolder with train/ and val/: JPEGs and PNGs of mixed sizes; ``broken`` names (split, class, i) files
    written as a truncated JPEG. Returns the broken files' paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                h, w = SIZES[i % len(SIZES)]
                pixels = (rng.random((h, w, 3)) * 60 + 80 * c).astype(np.uint8)
                fmt = "PNG" if i % 3 == 2 else "JPEG"
                data = encode(pixels, fmt)
                path = root / split / name / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}"
                if (split, name, i) in broken:
                    data = encode(pixels, "JPEG")[:60]  # a header, then nothing: PIL fails on load
                    path = path.with_suffix(".jpg")
                    paths.append(str(path))
                path.write_bytes(data)
    return paths


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---- augmentation -------------------------------------------------------------------------------------------
def test_crop_boxes_match_random_resized_crop_statistics():
    """Keyed boxes lie in the image, keep scale and ratio in range, and have the distribution of torchvision's
    RandomResizedCrop.get_params (the reference, driven by torch's RNG) on the same image sizes."""
    from torchvision.transforms import RandomResizedCrop
    n, H, W = 4000, 60, 90
    boxes, flips = crop_boxes(keyed_uniform(0, 1, range(n), UNIFORMS), [H] * n, [W] * n)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    assert 0.45 < flips.mean() < 0.55
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, H, W), (0.08, 1.0), (3 / 4, 4 / 3))
                    for _ in range(n)])
    for ours, theirs in ((h * w / (H * W), ref[:, 2] * ref[:, 3] / (H * W)), (w / h, ref[:, 3] / ref[:, 2]),
                         (top / np.maximum(1, H - h), ref[:, 0] / np.maximum(1, H - ref[:, 2]))):
        assert abs(ours.mean() - theirs.mean()) < 0.03 and abs(ours.std() - theirs.std()) < 0.03
    # a 1 x 100 strip: no try fits, so the fallback centre crop with the ratio clamped to 4/3
    box, _ = crop_boxes(keyed_uniform(0, 1, [0], UNIFORMS), [1], [100])
    assert box.tolist() == [[0, 49, 1, 1]]


def test_the_gpu_resize_rounds_to_the_cpu_uint8_kernel():
    """The GPU's float-then-round resize (torch has no uint8 antialiased kernel on CUDA) is within one grey level of
    the CPU's uint8 kernel, run here on the CPU, down- and upscaling."""
    from fastvit.data.augment import _resize_float, _resize_uint8
    image = torch.from_numpy((np.random.default_rng(2).random((3, 41, 67)) * 255).astype(np.uint8))
    for size in ((16, 16), (24, 30), (60, 90)):
        a, b = _resize_uint8(image, size), _resize_float(image, size)
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, *size)
        assert (a.int() - b.int()).abs().max() <= 1 and (a != b).float().mean() < 0.5


def test_augment_equals_torchvision_ops_and_batches_mixed_sizes():
    """augment_batch = torchvision's resized_crop (uint8, antialiased bilinear) + hflip + normalize per image, for a
    batch of images of different sizes; eval_transform = resize shorter side + centre crop + normalize."""
    import torchvision.transforms.v2.functional as TF
    rng = np.random.default_rng(1)
    images = [torch.from_numpy((rng.random((3, h, w)) * 255).astype(np.uint8)) for h, w in SIZES]
    u = keyed_uniform(3, 7, range(len(images)), UNIFORMS)
    boxes, flips = crop_boxes(u, [h for h, _ in SIZES], [w for _, w in SIZES])
    out = augment_batch(images, u, 16)
    mean, std = [255 * m for m in (0.485, 0.456, 0.406)], [255 * s for s in (0.229, 0.224, 0.225)]
    for image, (t, l, h, w), flip, got in zip(images, boxes, flips, out):
        ref = TF.resized_crop(image, int(t), int(l), int(h), int(w), [16, 16], antialias=True).float()
        ref = TF.normalize(TF.horizontal_flip(ref) if flip else ref, mean, std)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    for image in images:
        short = round(16 / 0.875)
        ref = TF.center_crop(TF.resize(image, short, antialias=True), [16, 16]).float()
        torch.testing.assert_close(eval_transform(image, 16), TF.normalize(ref, mean, std), rtol=0, atol=1e-5)


# ---- unreadable samples -------------------------------------------------------------------------------------
def test_unreadable_sample_is_replaced_by_a_keyed_substitute(tmp_path):
    broken = make_folder(tmp_path, broken={("train", "dog", 1)})
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    keyed = source.keyed(seed=4)
    i = source.train_samples.paths.index(broken[0])
    x, y, _, bad, (used, step, pos, height, width) = keyed[(i, 9, 5)]
    assert [name for name, _ in bad] == [broken[0]] and bad[0][1]  # the file, and PIL's reason
    assert used == mix_seed(4, 9, 5, 1, 0xBAD) % source.num_train and (step, pos) == (9, 5)
    expect = keyed[(used, 9, 5)]  # the substitute, augmented with the key of the position it fills
    assert torch.equal(x, expect[0]) and y == expect[1] == int(source.train_samples.labels[used])
    assert (height, width) == decode_image(source.train_samples.read(used)).shape[1:]  # the substitute's size
    assert torch.equal(keyed[(i, 9, 5)][0], x)  # deterministic
    assert keyed[(i, 9, 6)][4][0] == mix_seed(4, 9, 6, 1, 0xBAD) % source.num_train  # keyed by the position too


def test_gpu_path_code_on_cpu_equals_cpu_path(tmp_path):
    """--decode gpu's batched decode_jpeg + augment_batch, run on CPU tensors, gives the CPU path's batches
    exactly (PNGs go through PIL on both; a broken JPEG is replaced the same way in the workers)."""
    make_folder(tmp_path, broken={("train", "owl", 0)})
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    gpu = FileSource(source.train_samples, source.train_samples, 16, workers=0, decode="cpu")
    gpu.decode = "gpu"  # what --decode gpu makes the loader workers return, decoded here on the CPU
    plan = list(micro_batch_plan(source.sampler(2), 2, 0, 0, 3, 6, 3, 1, 0))
    cpu_batches = list(source.loader(iter(plan), 2))
    keyed = gpu.keyed(2)
    loader = torch.utils.data.DataLoader(keyed, batch_sampler=plan, collate_fn=collate)
    gpu_batches = list(GpuDecoder(keyed, "cpu").batches(loader))
    assert sum(len(b) for _, _, b in cpu_batches) >= 1
    for (xa, ya, ba), (xb, yb, bb) in zip(cpu_batches, gpu_batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ba == bb
    with pytest.raises(ValueError, match="--decode gpu needs a CUDA device"):
        FileSource(source.train_samples, source.train_samples, 16, decode="gpu", device="cpu")


def test_decode_dali_without_dali_says_how_to_get_it(monkeypatch):
    import importlib.util

    from fastvit.data.sources import decode_problem
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nvidia.dali" else real(name, *a))
    assert "--decode dali needs NVIDIA DALI (pip install -e \".[dali]\"" in decode_problem("dali", False, "cuda")
    assert decode_problem("gpu", False, "cuda") is None and decode_problem("cpu", False, None) is None


def test_training_with_broken_files_counts_replaces_and_resumes(tmp_path):
    """Two unreadable training files: the run warns naming them, logs bad_samples, gives the same losses for 1 x 6
    and 3 micro-batches of 2 (replacements do not depend on the split), and a resumed run (dropout on) repeats the
    uninterrupted one bitwise."""
    broken = make_folder(tmp_path / "data", broken={("train", "dog", 1), ("train", "cat", 4), ("val", "owl", 3)})
    common = dict(TINY, data=str(tmp_path / "data"), steps=4, global_batch=6, seed=1, max_bad_frac=0.5)
    with pytest.warns(BadSampleWarning) as record:
        train(TrainConfig(**common, out=str(tmp_path / "a"), micro_batch=6))
    named = {str(w.message).split(" (")[0].removeprefix("unreadable sample ") for w in record}
    assert named <= set(broken) and named & set(broken[:2])
    assert broken[2] in named  # the held-out one, left out of evaluation
    a = [r for r in rows(tmp_path / "a") if "loss" in r]
    assert a[-1]["bad_samples"] > 0 and [r["bad_samples"] for r in a] == sorted(r["bad_samples"] for r in a)
    with pytest.warns(BadSampleWarning):
        train(TrainConfig(**common, out=str(tmp_path / "b"), micro_batch=2))
    b = [r for r in rows(tmp_path / "b") if "loss" in r]
    assert [r["bad_samples"] for r in b] == [r["bad_samples"] for r in a]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)

    def crash(step, row):
        if step == 2:
            raise KeyboardInterrupt

    # with dropout and drop-path on (their draws come after the loader's start: a loader must not draw from the
    # global generator, or a resumed run's dropout stream is shifted by that draw)
    resumed = dict(common, out=str(tmp_path / "c"), micro_batch=6, save_every=2, dropout=0.1, drop_path=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**resumed), on_step_end=crash)
        train(TrainConfig(**resumed))
        train(TrainConfig(**dict(resumed, out=str(tmp_path / "d"))))
    c, d = ([(r["loss"], r["bad_samples"]) for r in rows(tmp_path / x) if "loss" in r] for x in "cd")
    assert c == d and [n for _, n in d] == [r["bad_samples"] for r in a]


def test_sigterm_to_the_process_group_saves_with_loader_workers(tmp_path):
    """A scheduler (SLURM's scancel), torchrun or a terminal signals the whole process group, loader workers
    included: the workers leave the signal to the trainer, which saves at the end of the step and exits 143 (a
    worker killed by it used to end the run with a traceback and nothing saved)."""
    make_folder(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    flags = ["--data", str(tmp_path / "data"), "--workers", "2", "--steps", "100000", "--global-batch", "6",
             "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
             "--save-every", "100000", "--eval-every", "100000", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "fastvit.train", *flags], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len([r for r in rows(out) if "loss" in r]) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    last = [r for r in rows(out) if "loss" in r][-1]["step"]
    assert proc.returncode == 128 + signal.SIGTERM.value, output[-3000:]
    assert f"SIGTERM: saved checkpoint at step {last}" in output and "Traceback" not in output, output[-3000:]


def test_a_run_resumes_with_its_data_folder_written_another_way(tmp_path, monkeypatch, capsys):
    """'data', 'data/' and the absolute path name one folder: resuming with another spelling goes on from the
    checkpoint (it is not refused as another run's); another folder still is. The saved model's config holds the
    run's evaluation preprocessing, and few-shot evaluation of the run or its model folder takes the run's data."""
    make_folder(tmp_path / "data")
    make_folder(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    common = dict(TINY, steps=2, global_batch=6, save_every=2, out=str(tmp_path / "run"))
    train(TrainConfig(**common, data="data"))
    train(TrainConfig(**dict(common, steps=3), data=str(tmp_path / "data") + "/"))
    assert [r["step"] for r in rows(tmp_path / "run") if "loss" in r] == [1, 2, 3]
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["pretrained_cfg"]
    assert {k: saved[k] for k in EVAL_CFG} == json.loads(json.dumps(EVAL_CFG))  # how the run evaluated images
    for init in ("run", "run/model"):  # few-shot without --data evaluates on the run's data, not on digits
        assert fewshot.main(["--init", init, "--shots", "1", "--seeds", "1", "--workers", "0"])[1]["mean"] >= 0
        said = capsys.readouterr().out
        assert f"few-shot on --data {tmp_path / 'data'}/, the data the run {init} trained on" in said
    with pytest.raises(ValueError, match="holds checkpoints of another run .--data '.*data/' -> 'other'"):
        train(TrainConfig(**dict(common, steps=4), data="other"))


def test_too_many_bad_samples_stop_the_run_with_a_clear_error(tmp_path, capsys):
    make_folder(tmp_path / "data", broken={("train", "dog", 1), ("train", "cat", 4), ("train", "owl", 5)})
    flags = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "20", "--global-batch", "6",
             "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
             "--workers", "0", "--max-bad-frac", "0.05"]
    with pytest.warns(BadSampleWarning), pytest.raises(SystemExit) as exit_info:
        main(flags)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "1 unreadable sample among the 6 drawn so far exceeds --max-bad-frac 0.05 x max(drawn, training-set " \
           "size 18)" in err
    assert "Repair or remove them, or raise --max-bad-frac" in err  # no shard tool for an image folder
    # 18 training images, 0.05 x 18 = 0.9: the first bad sample drawn stops it, before its step updates the model
    logged = [r for r in rows(tmp_path / "run") if "loss" in r]
    assert all(r["bad_samples"] == 0 for r in logged)


def test_the_bad_sample_limit_keeps_the_finished_steps(tmp_path):
    """A run stopped by --max-bad-frac after some steps saves them (the model as before the failing step, its
    dropout generator too); the same run with a larger limit goes on from there and repeats, bitwise, a run that
    had the larger limit from the start."""
    make_folder(tmp_path / "data", broken={("train", "dog", 1), ("train", "cat", 4), ("train", "owl", 5)})
    common = dict(TINY, data=str(tmp_path / "data"), steps=8, global_batch=6, seed=3, dropout=0.1, save_every=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(DataError, match=r"Saved checkpoint at step (\d+), before this step: the same command "
                                            r"with a larger --max-bad-frac goes on from there") as stopped:
            train(TrainConfig(**common, out=str(tmp_path / "a"), max_bad_frac=0.12))
        saved = int(re.search(r"at step (\d+), before", str(stopped.value)).group(1))
        assert 0 < saved < 8 and [r["step"] for r in rows(tmp_path / "a") if "loss" in r][-1] == saved
        train(TrainConfig(**common, out=str(tmp_path / "a"), max_bad_frac=0.5))
        train(TrainConfig(**common, out=str(tmp_path / "b"), max_bad_frac=0.5))
    a, b = ([(r["step"], r["loss"], r["bad_samples"]) for r in rows(tmp_path / x) if "loss" in r] for x in "ab")
    assert a == b and a[-1][0] == 8


def test_no_readable_held_out_image_leaves_top1_unmeasured(tmp_path, capsys):
    """Every held-out image unreadable: the run trains, says the accuracy (and the few-shot accuracy) was not
    measured, and metrics.jsonl holds null (strict JSON; it held NaN, printed as "nan%", and few-shot raised a
    traceback); two seeds write no summary of values they do not have."""
    make_folder(tmp_path / "data", per_class=2, broken={("val", c, i) for c in ("cat", "dog", "owl") for i in range(2)})
    flags = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "2", "--global-batch", "2",
             "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
             "--workers", "0", "--seeds", "2", "--fewshot"]
    with pytest.warns(BadSampleWarning, match="left out of evaluation"):
        results = main(flags)
    assert [r["top1"] for r in results] == [None, None] and all(r["model_dir"] for r in results)
    assert [r["fewshot"] for r in results] == [None, None]
    out = capsys.readouterr().out
    assert out.count("few-shot: not measured (none of the 6 held-out images could be read") == 2, out
    assert out.count("held-out top-1 not measured (no held-out image could be read") == 4, out  # step 2, final
    assert "nan" not in out.lower() and not (tmp_path / "run" / "seeds.json").exists()
    lines = (tmp_path / "run" / "seed_0" / "metrics.jsonl").read_text().splitlines()
    rows_ = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert [r["final_top1"] for r in rows_ if "final_top1" in r] == [None]


def test_resuming_on_a_changed_training_set_says_so(tmp_path):
    """config.json records the training-set size and fingerprint; a resume on a folder that has since lost (or
    gained) images warns that the run no longer repeats an uninterrupted one, naming both counts, and so does one
    on as many images but other files; an unchanged one does not."""
    make_folder(tmp_path / "data")
    cfg = TrainConfig(**dict(TINY, data=str(tmp_path / "data"), out=str(tmp_path / "run"), steps=2, global_batch=4))
    train(cfg)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert recorded == {"train_samples": 18, "train_fingerprint": FolderSamples(str(tmp_path / "data" / "train"))
                        .fingerprint}
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.CheckpointWarning)
        train(dataclasses.replace(cfg, steps=3))
    first = sorted((tmp_path / "data" / "train" / "owl").iterdir())[0]
    first.rename(first.with_name("zz_" + first.name))  # as many images, another order of files
    with pytest.warns(checkpoint.CheckpointWarning, match=r"was trained on other samples than --data now holds "
                                                          r"\(as many, 18, but other files"):
        assert train(dataclasses.replace(cfg, steps=4))["step"] == 4
    next((tmp_path / "data" / "train" / "owl").iterdir()).unlink()
    with pytest.warns(checkpoint.CheckpointWarning, match=r"was trained on 18 training samples and --data now "
                                                          r"holds 17: it resumes"):
        assert train(dataclasses.replace(cfg, steps=5))["step"] == 5


def test_a_training_set_fingerprint_names_its_images_not_where_they_lie(tmp_path):
    """The same image files in another folder have the fingerprint they had; an image moved to another class
    changes it."""
    make_folder(tmp_path / "a", per_class=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a = FolderSamples(str(tmp_path / "a" / "train")).fingerprint
    assert FolderSamples(str(tmp_path / "b" / "train") + "/").fingerprint == a
    moved = next((tmp_path / "b" / "train" / "cat").iterdir())
    moved.rename(tmp_path / "b" / "train" / "dog" / moved.name)
    assert FolderSamples(str(tmp_path / "b" / "train")).fingerprint != a


def test_broken_data_read_by_loader_workers_ends_with_the_one_line_error(tmp_path, capsys):
    """Data found broken in a loader worker ends the run with the error's own line, as with --workers 0, not the
    worker's traceback that torch puts in front of it."""
    make_folder(tmp_path / "data", per_class=2, broken={(split, c, i) for split in ("train", "val")
                                                       for c in ("cat", "dog", "owl") for i in range(2)})
    flags = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "2", "--global-batch", "2",
             "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
             "--workers", "1", "--max-bad-frac", "1"]
    with pytest.raises(SystemExit) as exit_info:
        main(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err and "Caught" not in err, err[-2000:]
    assert re.search(r"^error: 17 samples in a row could not be read or decoded \(last: .*\.jpg: ", err, re.M), err


def test_warnings_in_a_log_start_lines_of_their_own(tmp_path):
    """Not on a terminal (a log file, a scheduler's output) tqdm writes a bar's updates to one line; a warning
    printed while it runs starts a new line instead of being appended to the bar's."""
    make_folder(tmp_path / "data", broken={("train", "dog", 1)})
    flags = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--steps", "6", "--global-batch",
             "6", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
             "--workers", "0", "--max-bad-frac", "1", "--eval-every", "3"]
    proc = subprocess.run([sys.executable, "-m", "fastvit.train", *flags], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "it/s" in proc.stderr and proc.stderr.count("warning: unreadable sample") >= 1, proc.stderr[-2000:]
    assert proc.stderr.count("warning: unreadable sample") == len(re.findall(r"^warning: unreadable sample",
                                                                             proc.stderr, re.M)), proc.stderr


def test_a_sample_that_never_decodes_is_a_data_error(tmp_path):
    make_folder(tmp_path, per_class=1, classes=("a",), broken={("train", "a", 0)})
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    with pytest.raises(DataError, match="17 samples in a row could not be read"):
        source.keyed(0)[(0, 0, 0)]


def test_decode_image_is_pil_for_every_jpeg_mode_and_names_what_is_broken():
    """JPEGs go through torchvision's decoder, other formats through PIL: the same pixels as PIL for RGB, grey and
    CMYK JPEGs and a PNG, without torchvision's deprecation warning (a run under -W error goes on); a truncated
    JPEG raises PIL's error, which says what is wrong."""
    pixels = (np.random.default_rng(3).random((37, 52, 3)) * 255).astype(np.uint8)
    for mode, fmt in (("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG")):
        out = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(out, format=fmt)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = decode_image(out.getvalue())
        ref = decode_pil(out.getvalue())
        assert got.dtype == torch.uint8 and got.shape == (3, 37, 52) and torch.equal(got, ref), (mode, fmt)
    jpeg = encode(pixels, "JPEG")
    with pytest.raises(OSError, match="image file is truncated"):
        decode_image(jpeg[:len(jpeg) // 2])
    with pytest.raises(OSError, match=r"cannot identify image data \(9 bytes; not an image format PIL reads: it "
                                      r"starts b'not an i'\)"):
        decode_image(b"not an im")  # PIL's own message would name a BytesIO object
    with pytest.raises(OSError, match=r"\(64 bytes; it starts as a JPEG file: damaged or cut short\)"):
        decode_image(jpeg[:4] + bytes(60))


def test_a_16_bit_grey_png_keeps_its_range():
    """A 16-bit grey PNG (scans, medical and satellite crops) decodes to its top 8 bits in every channel: PIL's
    convert("RGB"), torchvision's ImageFolder loader's too, clips at 255 and made most of such an image white."""
    ramp = np.linspace(0, 65535, 40 * 30).astype(np.uint16).reshape(30, 40)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    assert Image.open(io.BytesIO(out.getvalue())).mode.startswith("I")
    got = decode_image(out.getvalue())
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8)).expand(3, -1, -1)
    assert got.dtype == torch.uint8 and torch.equal(got, expected)


def test_folder_samples_read_files(tmp_path):
    make_folder(tmp_path)
    samples = FolderSamples(str(tmp_path / "train"))
    assert samples.classes == ["cat", "dog", "owl"] and len(samples) == 18
    assert samples.read(0) == Path(samples.name(0)).read_bytes()
    assert decode_image(samples.read(0)).shape == (3, *SIZES[0])
    (tmp_path / "train" / "yak").mkdir()  # a class folder without images: the error says where
    with pytest.raises(ValueError, match=r"ImageFolder .*train: Found no valid file for the classes yak.*every class "
                                         r"folder needs at least one image"):
        FolderSamples(str(tmp_path / "train"))
    for split in ("train", "val"):  # an empty data folder names both layouts --data takes
        (tmp_path / "empty" / split).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty.train holds no class folders: --data takes an ImageFolder .* or "
                                         r"WebDataset shards .root/train/\*.tar."):
        make_source(str(tmp_path / "empty"), 16)


def test_fewshot_leaves_unreadable_images_out(tmp_path):
    """fastvit.fewshot on an ImageFolder with a broken training and a broken held-out file: the ridge fit and the
    test set skip them, i.e. the result equals a direct fit on the readable images only."""
    from fastvit import fewshot
    broken = make_folder(tmp_path, broken={("train", "dog", 0), ("val", "cat", 2)})
    source = ImageFolderSource(str(tmp_path), img_size=8, workers=0)
    from test_fewshot import PixelFeatures
    model = PixelFeatures()
    with pytest.warns(BadSampleWarning):
        got = fewshot.evaluate(model, source.train_eval, source.test, shots=(6,), seeds=1)[6]["accs"][0]

    def readable(dataset):
        keep = [i for i in range(len(dataset)) if dataset.samples.name(i) not in broken]
        x = torch.stack([dataset[i][0][0].flatten() for i in keep])
        return x, torch.as_tensor(dataset.targets[keep])
    (train_x, train_y), (test_x, test_y) = readable(source.train_eval), readable(source.test)
    assert len(train_y) == 17 and len(test_y) == 17
    assert got == pytest.approx(fewshot.lsr_accuracy(train_x, train_y, test_x, test_y), abs=1e-12)


def test_fewshot_decodes_in_its_loader_workers(tmp_path, monkeypatch):
    """fewshot's --workers (and the trainer's, for its few-shot evaluation) decode the images in that many loader
    processes (they used to be ignored: every image decoded in the main process), with the same result."""
    from fastvit import fewshot
    from test_fewshot import PixelFeatures
    make_folder(tmp_path / "data")
    source = ImageFolderSource(str(tmp_path / "data"), img_size=8, workers=0)
    alone = fewshot.evaluate(PixelFeatures(), source.train_eval, source.test, shots=(2,), seeds=1)
    real, asked = torch.utils.data.DataLoader, []
    monkeypatch.setattr(torch.utils.data, "DataLoader",
                        lambda *a, **kw: asked.append(kw["num_workers"]) or real(*a, **kw))
    assert fewshot.main(["--data", str(tmp_path / "data"), "--img-size", "8", "--patch-size", "4", "--embed-dim",
                         "16", "--depth", "1", "--num-heads", "2", "--workers", "2", "--shots", "2", "--seeds", "1"])
    assert asked == [2, 2]
    asked.clear()
    assert fewshot.evaluate(PixelFeatures(), source.train_eval, source.test, shots=(2,), seeds=1, workers=2) == alone
    assert asked == [2, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="--decode gpu needs CUDA")
def test_gpu_decode_on_cuda_is_close_to_the_cpu_path(tmp_path):
    """On a GPU: nvjpeg + the GPU resize give the CPU path's batches up to decoder rounding (a few grey levels),
    the same labels and the same replacements, and a short training run with --decode gpu works."""
    make_folder(tmp_path, broken={("train", "owl", 0)})
    cpu = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    gpu = ImageFolderSource(str(tmp_path), img_size=16, workers=1, decode="gpu", device="cuda")
    plan = list(micro_batch_plan(cpu.sampler(2), 2, 0, 0, 3, 6, 3, 1, 0))
    for (xa, ya, ba), (xb, yb, bb) in zip(cpu.loader(iter(plan), 2), gpu.loader(iter(plan), 2), strict=True):
        assert xb.is_cuda and torch.equal(ya, yb.cpu()) and ba == bb
        assert (xa - xb.cpu()).abs().max() < 8 / 255 / 0.225  # 8 grey levels, in normalised units
    result = train(TrainConfig(**dict(TINY, workers=1), data=str(tmp_path), out=str(tmp_path / "run"), steps=2,
                               global_batch=6, decode="gpu", max_bad_frac=0.5))
    assert result["step"] == 2
