"""fastvit.train on one process: a short digits run, fine-tuning from it, resume past corrupt checkpoints, SIGTERM,
non-finite losses, recipes (optimizer groups, schedule) and flag errors. Multi-rank tests live in
test_train_distributed.py, the FLOP count in test_flops.py."""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fastvit
from fastvit import checkpoint
from fastvit.flops import train_flops_per_image
from fastvit.config import TrainConfig, resolve, steps_for
from fastvit.recipes import WarmupDecay, param_groups
from fastvit.train import _StopRequest, main, train

ROOT = Path(__file__).resolve().parents[1]
# a 2-block ViT of width 32 on 16x16 digits: a step takes a few milliseconds
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, global_batch=32)
TINY_FLAGS = ["--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
              "--global-batch", "32"]


def rows(out, key):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 150-step digits pre-training run (a few seconds; the short run of the issue), reused by fine-tune and
    few-shot tests."""
    out = tmp_path_factory.mktemp("pretrain")
    with torch.random.fork_rng():
        result = train(TrainConfig(out=str(out), steps=150, lr=5e-3, warmup_steps=10, eval_every=75, save_every=75,
                                   fewshot=True, **{**TINY, "global_batch": 64}))
    return out, result


def test_short_digits_run_learns(pretrained):
    out, result = pretrained
    losses = [r["loss"] for r in rows(out, "loss")]
    assert [r["step"] for r in rows(out, "loss")] == list(range(1, 151))
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5  # the loss falls
    assert result["top1"] > 0.4  # chance is 0.1
    assert [r["step"] for r in rows(out, "eval_top1")] == [75, 150]
    assert rows(out, "eval_top1")[-1]["eval_top1"] == result["top1"]
    first = rows(out, "loss")[0]
    assert first["img_per_s"] > 0 and first["lr"] == pytest.approx(5e-3 / 10)  # warmup step 1 of 10
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in checkpoint.resume_candidates(out)] == ["step_00000150", "step_00000075"]
    final = rows(out, "final_top1")[-1]
    assert final["fewshot"] == {str(k): v for k, v in result["fewshot"].items()}  # --fewshot: logged, returned
    assert sorted(result["fewshot"]) == [1, 5, 10, 25] and len(result["fewshot"][25]["accs"]) == 3
    assert result["fewshot"][25]["mean"] > result["fewshot"][1]["mean"]
    stored = json.loads((out / "config.json").read_text())
    assert stored["model"]["kwargs"]["embed_dim"] == 32 and stored["train"]["recipe"] == "pretrain"


def test_finetune_from_pretrain_checkpoint(pretrained, tmp_path, capsys):
    """SGD from the pretrain run at 32x32: zero head (first loss = ln 10), resampled position table, both said."""
    out, _ = pretrained
    result = train(TrainConfig(recipe="finetune", init=str(out), out=str(tmp_path), steps=3, img_size=32,
                               global_batch=32, warmup_steps=1, eval_every=3))
    assert (f"--init {out}: position table resampled from 4x4 to 8x8 patches; new zero-initialised head (10 "
            f"classes)") in capsys.readouterr().out
    losses = rows(tmp_path, "loss")
    assert losses[0]["loss"] == pytest.approx(math.log(10), abs=1e-6)
    assert losses[-1]["loss"] < losses[0]["loss"]
    assert result["top1"] > 0.1
    final = checkpoint.read_tensors(checkpoint.step_path(tmp_path, 3))
    assert final["model.pos_embed"].shape == (1, 1 + 8 * 8, 32)
    assert "optim.state.head.weight.momentum_buffer" in final  # SGD with momentum
    assert not any(k.endswith("exp_avg") for k in final)
    assert checkpoint.read_config(checkpoint.step_path(tmp_path, 3))["model"]["kwargs"]["img_size"] == 32


def test_a_pretraining_warm_start_keeps_the_head(pretrained, tmp_path, capsys):
    """--init under the pretrain recipe continues from the weights, head included where the class count fits: the
    first loss is the trained model's, not ln 10 as after fine-tuning's zero head."""
    out, result = pretrained
    train(TrainConfig(init=str(out), out=str(tmp_path), steps=1, eval_every=1, **TINY))
    assert f"--init {out}: its head kept (10 classes)" in capsys.readouterr().out
    assert rows(tmp_path, "loss")[0]["loss"] < math.log(10) - 0.3  # a zero head gives ln 10 exactly


def test_init_from_the_run_s_model_folder_equals_init_from_its_checkpoint(pretrained, tmp_path):
    """out/model (a timm folder of the final weights) works as --init, as the run folder does: the same losses."""
    out, _ = pretrained
    losses = []
    for name, init in (("folder", out / "model"), ("run", out)):
        train(TrainConfig(recipe="finetune", init=str(init), out=str(tmp_path / name), steps=2, img_size=16,
                          global_batch=32, warmup_steps=1, eval_every=2))
        losses.append([r["loss"] for r in rows(tmp_path / name, "loss")])
    assert losses[0] == losses[1] and losses[0][0] == pytest.approx(math.log(10), abs=1e-6)
    stored = json.loads((tmp_path / "folder" / "config.json").read_text())["model"]
    assert stored["kwargs"]["embed_dim"] == 32 and stored["kwargs"]["num_classes"] == 10


def test_resume_takes_a_run_folder_and_a_seeds_folder_is_named(pretrained, tmp_path):
    """--resume RUN_FOLDER continues from its newest complete checkpoint (as --init takes run folders); a --seeds
    parent folder, which holds none itself, is named as such."""
    out, _ = pretrained
    train(TrainConfig(out=str(tmp_path / "more"), resume=str(out), steps=152, lr=5e-3, warmup_steps=10,
                      eval_every=152, **{**TINY, "global_batch": 64}))
    assert [r["step"] for r in rows(tmp_path / "more", "loss")] == [151, 152]
    # another run's checkpoint is refused as --out's are, with the difference named
    with pytest.raises(ValueError, match=r"--resume .* holds checkpoints of another run \(--seed 0 -> 5\); pass a "
                                         r"checkpoint of this run to --resume, or start from its weights with --init"):
        train(TrainConfig(out=str(tmp_path / "other"), resume=str(out), seed=5, steps=152, lr=5e-3, warmup_steps=10,
                          **{**TINY, "global_batch": 64}))
    with pytest.raises(ValueError, match=r"--resume .* \(embed_dim 32 -> 64\); pass a checkpoint of this run to "
                                         r"--resume$"):
        train(TrainConfig(out=str(tmp_path / "wide"), resume=str(out), steps=152,
                          **{**TINY, "global_batch": 64, "embed_dim": 64}))
    (tmp_path / "seeds" / "seed_0").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"a --seeds run: pass one of its folders, seed_0"):
        checkpoint.find_checkpoint(tmp_path / "seeds")


def test_a_pretraining_warm_start_on_digits_keeps_the_checkpoint_s_sizes(pretrained, tmp_path, capsys):
    """--init without size flags on digits: the checkpoint's architecture; the preset's sizes (width 64, depth 4)
    no longer fill in as if passed, which refused the run naming an --embed-dim never given."""
    out, _ = pretrained
    assert train(TrainConfig(init=str(out), out=str(tmp_path / "warm"), steps=1, warmup_steps=1,
                             global_batch=32))["step"] == 1
    kwargs = checkpoint.read_config(checkpoint.step_path(tmp_path / "warm", 1))["model"]["kwargs"]
    assert (kwargs["embed_dim"], kwargs["depth"], kwargs["num_heads"], kwargs["patch_size"]) == (32, 2, 2, 4)
    assert "embed_dim=64" not in capsys.readouterr().out


@pytest.mark.parametrize("pos_embed,said", [("none", "a new grid of 8x8 patches (no position table to resample)"),
                                            ("rel", "relative position bias resampled from 4x4 to 8x8 patches")])
def test_init_says_what_it_resampled_for_each_position_embedding(tmp_path, capsys, pos_embed, said):
    """A fine-tune at another size says which table it resampled: a relative bias table, or none at all (it said
    "position table resampled" for a model without one)."""
    main(["--out", str(tmp_path / "pre"), "--steps", "1", "--warmup-steps", "1", "--pos-embed", pos_embed,
          *TINY_FLAGS])
    capsys.readouterr()
    train(TrainConfig(recipe="finetune", init=str(tmp_path / "pre"), out=str(tmp_path / "ft"), steps=1, img_size=32,
                      global_batch=32, warmup_steps=1))
    assert f"--init {tmp_path / 'pre'}: {said}; new zero-initialised head" in capsys.readouterr().out


def test_init_refuses_another_model_name(pretrained, tmp_path, capsys):
    """--model names an architecture; with --init of a run of another one it is an error, not ignored."""
    out, _ = pretrained
    with pytest.raises(SystemExit) as exit_info:
        main(["--recipe", "finetune", "--init", str(out), "--model", "vit_huge_patch14_224", "--steps", "1",
              "--out", str(tmp_path / "ft")])
    assert exit_info.value.code == 2
    assert "--model vit_huge_patch14_224 cannot change the architecture" in capsys.readouterr().err


def test_the_final_model_is_a_timm_hub_folder(pretrained):
    """out/model holds config.json + model.safetensors that timm and fastvit load ('local-dir:') as the run's final
    weights."""
    import timm
    out, result = pretrained
    assert result["model_dir"] == str(out / "model")
    final = checkpoint.read_tensors(checkpoint.step_path(out, 150))
    ours = fastvit.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    theirs = timm.create_model(f"local-dir:{out / 'model'}", pretrained=True).eval()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, final[f"model.{name}"]), name
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    # timm's data config is the run's preprocessing (digits: [-1, 1], no crop), not that of the architecture's weights
    data_cfg = timm.data.resolve_data_config(model=theirs)
    assert (tuple(data_cfg["mean"]), tuple(data_cfg["std"]), data_cfg["crop_pct"], data_cfg["input_size"]) == \
        ((0.5,) * 3, (0.5,) * 3, 1.0, (3, 16, 16))
    assert ours.pretrained_cfg["tag"] is None


def test_layer_decay_matches_timms_rule(pretrained, tmp_path):
    """--layer-decay gives each parameter timm's param_groups_layer_decay lr scale; the head group trains at --lr."""
    from timm.optim import param_groups_layer_decay
    model = fastvit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10)
    ours = {id(p): (g["lr_scale"], g["weight_decay"]) for g in param_groups(model, 0.05, 0.1, 0.7)
            for p in g["params"]}
    expected = {id(p): (g["lr_scale"], g["weight_decay"])
                for g in param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(),
                                                  layer_decay=0.7) for p in g["params"]}
    assert ours.keys() == expected.keys()
    for key, (scale, wd) in ours.items():
        assert scale == pytest.approx(expected[key][0]) and wd == expected[key][1]
    # a backbone under a head of the user's: its last block trains at lr; a frozen head still counts, as in timm
    headless = fastvit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0)
    model.head.requires_grad_(False)
    for m in (headless, model):
        ours = {id(p): g["lr_scale"] for g in param_groups(m, 0.05, 0.1, 0.7) for p in g["params"]}
        expected = {id(p): g["lr_scale"] for g in param_groups_layer_decay(m, 0.05, layer_decay=0.7)
                    for p in g["params"]}
        assert ours == pytest.approx(expected)
    out, _ = pretrained
    train(TrainConfig(recipe="finetune", init=str(out), out=str(tmp_path), steps=2, img_size=16, global_batch=32,
                      warmup_steps=1, eval_every=2, layer_decay=0.5))
    assert rows(tmp_path, "loss")[0]["lr"] == pytest.approx(0.01 * 32 / 128 / 1)  # the head's: lr at step 1 of 1


def test_compile_bf16_and_a_16_bit_residual_stream_train(tmp_path):
    """--compile gives eager's losses; --precision bf16 --residual-dtype autocast trains on CPU and is stored."""
    eager = train(TrainConfig(out=str(tmp_path / "eager"), steps=3, warmup_steps=1, eval_every=3, **TINY))
    train(TrainConfig(out=str(tmp_path / "compiled"), steps=3, warmup_steps=1, eval_every=3, compile=True, **TINY))
    for a, b in zip(rows(tmp_path / "eager", "loss"), rows(tmp_path / "compiled", "loss")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    result = train(TrainConfig(out=str(tmp_path / "bf16"), steps=3, warmup_steps=1, eval_every=3, precision="bf16",
                               residual_dtype="autocast", **TINY))
    assert result["top1"] is not None and eager["top1"] is not None
    stored = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert stored["model"]["kwargs"]["residual_dtype"] == "autocast"
    bf16 = [r["loss"] for r in rows(tmp_path / "bf16", "loss")]
    assert all(math.isfinite(v) for v in bf16) and bf16 != [r["loss"] for r in rows(tmp_path / "eager", "loss")]


def test_finetune_from_weights_file(pretrained, tmp_path):
    """--init a plain state_dict file (timm layout) loads through fastvit.convert into a headless model."""
    out, _ = pretrained
    pre = checkpoint.read_tensors(checkpoint.step_path(out, 150))
    weights = {k[len("model."):]: v for k, v in pre.items() if k.startswith("model.")}
    torch.save(weights, tmp_path / "weights.pth")
    train(TrainConfig(recipe="finetune", init=str(tmp_path / "weights.pth"), model="vit_tiny_patch16_224",
                      out=str(tmp_path / "ft"), steps=1, warmup_steps=1, **TINY))
    assert rows(tmp_path / "ft", "loss")[0]["loss"] == pytest.approx(math.log(10), abs=1e-6)


def test_fewshot_cli_on_checkpoint(pretrained, capsys):
    out, _ = pretrained
    from fastvit import fewshot
    results = fewshot.main(["--init", str(out), "--shots", "1", "10", "--seeds", "2"])
    assert "few-shot (2 seeds" in capsys.readouterr().out
    assert results[10]["mean"] > results[1]["mean"] > 0.1


def test_resume_skips_corrupt_checkpoints_and_is_exact(tmp_path):
    """A run stopped at step 4 with checkpoints 1-4; 4's shard is truncated, 3 lost its metadata and a .tmp
    folder is left over: resume auto warns, falls back to step 2 and then repeats steps 3-4 bitwise."""
    cfg = TrainConfig(out=str(tmp_path), steps=6, warmup_steps=2, save_every=1, keep=0, eval_every=100, **TINY)

    def crash(step, row):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, on_step_end=crash)
    first = rows(tmp_path, "loss")
    weights_at_4 = checkpoint.read_tensors(checkpoint.step_path(tmp_path, 4))
    root = tmp_path / "checkpoints"
    shard = root / "step_00000004" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    (root / "step_00000003" / ".metadata").unlink()
    (root / "step_00000005.tmp").mkdir()
    with pytest.warns(checkpoint.CheckpointWarning) as record:
        result = train(cfg)
    messages = " ".join(str(w.message) for w in record)
    assert "step_00000004: loading failed" in messages and "step_00000003: no .metadata" in messages
    assert "a file ends early (truncated or corrupt)" in messages  # the truncated shard's EOFError has no text
    assert "step_00000005.tmp: incomplete" in messages
    assert result["step"] == 6
    resumed = rows(tmp_path, "loss")
    assert [r["step"] for r in resumed] == list(range(1, 7))  # rows after step 2 were rewritten
    assert [r["loss"] for r in resumed[2:4]] == [r["loss"] for r in first[2:4]]
    again = checkpoint.read_tensors(checkpoint.step_path(tmp_path, 4))
    for key in ("model.blocks.1.mlp.fc2.weight", "model.pos_embed", "optim.state.head.weight.exp_avg_sq"):
        assert torch.equal(again[key], weights_at_4[key]), key
    assert not (root / "step_00000005.tmp").exists()


def test_resuming_an_older_checkpoint_of_the_run_says_what_happens_to_the_newer(tmp_path):
    """--resume of one of --out's own checkpoints older than its newest: the newer ones stay until saved over
    (a --resume auto would take them up) and metrics.jsonl is cut back; the run says so, then repeats the steps."""
    cfg = TrainConfig(out=str(tmp_path), steps=4, warmup_steps=1, save_every=1, keep=0, eval_every=100, **TINY)
    train(cfg)
    first = rows(tmp_path, "loss")
    with pytest.warns(checkpoint.CheckpointWarning, match=r"holds checkpoints up to step 4: they stay until this "
                                                          r"run saves over them .* keeps its rows up to step 2"):
        train(dataclasses.replace(cfg, resume=str(checkpoint.step_path(tmp_path, 2))))
    assert [r["loss"] for r in rows(tmp_path, "loss")] == [r["loss"] for r in first]


def test_resuming_with_another_micro_batch_warns(tmp_path):
    """Another --micro-batch on resume splits each global batch otherwise (other dropout draws, another order of
    summation): a warning says so, as for another number of ranks; the same split resumes without one."""
    flags = ["--out", str(tmp_path), "--eval-every", "100", "--save-every", "2", *TINY_FLAGS]
    main(["--steps", "2", "--micro-batch", "16", *flags])
    with warnings.catch_warnings():
        warnings.simplefilter("error", checkpoint.CheckpointWarning)
        main(["--steps", "3", "--micro-batch", "16", *flags])
    with pytest.warns(checkpoint.CheckpointWarning, match=r"step_00000003 was saved by 1 rank\(s\) x micro-batch 16 "
                                                          r"and is resumed on 1 rank\(s\) x micro-batch 8"):
        main(["--steps", "4", "--micro-batch", "8", *flags])
    assert [r["step"] for r in rows(tmp_path, "loss")] == [1, 2, 3, 4]


def test_resume_keeps_one_final_record_and_counts_time_on(tmp_path):
    """metrics.jsonl over restarts: training time goes on from the resumed step, and a run resumed (or rerun) at
    its end replaces its final record instead of adding one."""
    cfg = TrainConfig(out=str(tmp_path), steps=4, save_every=2, eval_every=4, warmup_steps=1, **TINY)
    for run_cfg in (dataclasses.replace(cfg, steps=2), cfg, cfg):
        train(run_cfg)
    steps = rows(tmp_path, "loss")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    times = [r["time"] for r in steps]
    assert times == sorted(times) and times[2] > times[1]
    assert [r["step"] for r in rows(tmp_path, "final_top1")] == [4]


def test_resume_with_more_steps_follows_the_new_schedule(pretrained, tmp_path):
    """--steps raised on resume: the restored LambdaLR follows the flags (linear decay now ends at step 152)."""
    out, _ = pretrained
    shutil.copytree(out, tmp_path / "run")
    train(TrainConfig(out=str(tmp_path / "run"), steps=152, lr=5e-3, warmup_steps=10, eval_every=75, save_every=75,
                      **{**TINY, "global_batch": 64}))
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path / "run", "loss")}
    assert sorted(lrs)[-3:] == [150, 151, 152]
    assert [lrs[151], lrs[152]] == pytest.approx([5e-3 * 2 / 142, 5e-3 * 1 / 142], rel=1e-12)


def test_a_cut_default_warmup_goes_on_as_the_run_had_it(tmp_path, capsys):
    """A 4-step run cuts the default warmup (30, the digits preset's) to 4 // 10 = 0; resumed with --steps 40 it
    keeps that warmup instead of starting a 30-step warmup at step 5 (lr back down to 5 / 30 of its peak)."""
    flags = ["--out", str(tmp_path), "--save-every", "2", "--eval-every", "100", *TINY_FLAGS]
    main(["--steps", "4", *flags])
    main(["--steps", "40", *flags])
    assert "warmup 0," in capsys.readouterr().out.split("resumed from")[-1]
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path, "loss")}
    assert lrs[5] > 0.8 * lrs[4] and json.loads((tmp_path / "config.json").read_text())["train"]["warmup_steps"] == 0


def _stop_after_steps(argv, out, sig, steps=3):
    """Run ``python -m fastvit.train argv``, send ``sig`` once ``out`` logged ``steps`` steps; (returncode,
    output)."""
    proc = subprocess.Popen([sys.executable, "-m", "fastvit.train", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and len(rows(out, "loss")) >= steps):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_stop_signal_saves_and_exits(tmp_path, sig):
    """SIGTERM (a scheduler's preemption) and Ctrl-C save a checkpoint at the end of the step and exit with the
    status a shell gives a process that signal killed (130, 143), reporting no final accuracy (the run is not
    finished)."""
    out = tmp_path / "run"
    code, output = _stop_after_steps(["--steps", "100000", "--out", str(out), "--save-every", "100000",
                                      "--eval-every", "100000", *TINY_FLAGS], out, sig)
    assert code == 128 + sig.value, output[-2000:]
    last = rows(out, "loss")[-1]["step"]
    assert f"{sig.name}: saved checkpoint at step {last}" in output and "Traceback" not in output
    assert f"(the same command with --out {out} resumes it)" in output
    assert [p.name for p in checkpoint.resume_candidates(out)] == [f"step_{last:08d}"]
    assert 3 <= last < 100000
    assert not rows(out, "final_top1") and not (out / "model").exists()


def test_ctrl_c_is_announced_once_per_job(capsys):
    """A terminal's Ctrl-C reaches every rank of a torchrun job: each records it, only rank 0 (announce) says it
    saves; a second Ctrl-C then interrupts at once (the previous handler is back)."""
    for announce in (True, False):
        with _StopRequest(announce) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert ("Ctrl-C: saving a checkpoint at the end of this step" in capsys.readouterr().err) == announce


def test_an_error_every_rank_raises_is_printed_once_per_job(monkeypatch, capsys):
    """Errors of all-reduced values or an agreed write (a non-finite loss, too many bad samples, a failed
    checkpoint) are raised by every rank with one message: rank 0 prints it, the others do not repeat it; an error
    of one rank (its data) is printed where it happened."""
    from fastvit.checkpoint import CheckpointWriteError
    from fastvit.data import DataError
    from fastvit.train import BadSampleLimit, report_error
    errors = [FloatingPointError("nan"), BadSampleLimit("17 bad"), CheckpointWriteError("disk full"),
              DataError("rank's own file")]
    for rank, printed in (("0", ["nan", "17 bad", "disk full", "rank's own file"]), ("1", ["rank's own file"])):
        monkeypatch.setenv("RANK", rank)
        for e in errors:
            report_error(e)
        assert capsys.readouterr().err.splitlines() == [f"error: {m}" for m in printed]


def test_a_stop_signal_ends_a_multi_seed_run(tmp_path):
    """--seeds 2 stopped during the first seed: that seed saves and the second is not started."""
    out = tmp_path / "runs"
    code, output = _stop_after_steps(["--seeds", "2", "--steps", "100000", "--out", str(out), "--save-every",
                                      "100000", "--eval-every", "100000", *TINY_FLAGS], out / "seed_0",
                                     signal.SIGTERM)
    assert code == 128 + signal.SIGTERM.value and "Traceback" not in output, output[-2000:]
    assert checkpoint.resume_candidates(out / "seed_0") and not (out / "seed_1").exists()
    # the command to resume names the --seeds run's folder: rerun with a seed's folder, it would nest new seeds there
    assert f"exiting (the same command with --out {out} resumes its seeds" in output


@pytest.mark.parametrize("flags,message", [
    (["--embed-dim", "16", "--num-heads", "2"], "embed_dim 32 -> 16"),
    (["--seed", "7"], "--seed 0 -> 7"),
    (["--steps", "100"], "--steps 100 is below step 150 of the checkpoint"),
    # another optimizer: its state would not load, and the run used to start afresh over the checkpoints
    (["--recipe", "finetune", "--init", "INIT"], "--recipe 'pretrain' -> 'finetune'"),
    (["--layer-decay", "0.75"], "--layer-decay None -> 0.75"),
    # config.json edited to agree: the optimizer state itself is found not to fit
    (["--layer-decay", "0.75", "EDIT"], "does not fit this run (it lacks 'optim.param_groups.2."),
])
def test_resuming_another_run_s_folder_is_refused(pretrained, tmp_path, capsys, flags, message):
    """An --out holding another model's, data stream's or optimizer's checkpoints (or a finished run beyond
    --steps) is an error naming the difference; nothing in the folder changes."""
    out, _ = pretrained
    shutil.copytree(out, tmp_path / "run")
    if "EDIT" in flags:
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        config["train"]["layer_decay"] = 0.75
        (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    base = ["--out", str(tmp_path / "run"), "--steps", "150", "--lr", "5e-3", "--warmup-steps", "10",
            *TINY_FLAGS[:-2], "--global-batch", "64"]
    argv = [str(out) if a == "INIT" else a for a in base + flags if a != "EDIT"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(tmp_path, capsys):
    """lr 1e30 (Adam steps ~ lr) blows the weights up in step 1: the run stops at step 2 without saving it, and
    says that step 1's checkpoint holds the weights that gave the loss (no good one is left). With a good start
    (lr 1e-3 for 2 steps), the weights step 3 blows up give a non-finite loss at step 4, and step 2's checkpoint
    (whose weights gave step 3 a finite loss) is the last good one."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "a"), "--steps", "5", "--lr", "1e30", "--warmup-steps", "0", "--save-every",
              "1", *TINY_FLAGS])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "step_00000001, holds the weights that gave it" in err
    assert "The last good checkpoint is none: start again with a lower --lr" in err
    assert [p.name for p in checkpoint.resume_candidates(tmp_path / "a")] == ["step_00000001"]
    main(["--out", str(tmp_path / "b"), "--steps", "2", "--lr", "1e-3", "--warmup-steps", "0", "--save-every", "1",
          *TINY_FLAGS])
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "b"), "--steps", "5", "--lr", "1e30", "--warmup-steps", "0", "--save-every",
              "1", *TINY_FLAGS])
    err = capsys.readouterr().err
    good = checkpoint.step_path(tmp_path / "b", 2)
    assert "non-finite loss at step 4" in err and "step_00000003, holds the weights" in err
    assert f"The last good checkpoint is {good}: resume from it with --resume {good}" in err


@pytest.mark.parametrize("argv,message", [
    (["--recipe", "foo"], "argument --recipe: invalid choice: 'foo'"),
    (["--schedule", "step"], "argument --schedule: invalid choice: 'step'"),
    (["--img-size", "big"], "argument --img-size: invalid int value: 'big'"),
    (["--steps", "5", "--epochs", "1"], "argument --epochs: not allowed with argument --steps"),
    (["--global-batch", "100", "--micro-batch", "64"],
     "--global-batch must be a multiple of ranks x --micro-batch = 1 x 64 = 64, got 100"),
    (["--recipe", "finetune"], "--recipe finetune needs --init PATH"),
    (["--resume", "/nonexistent/run"], "--resume must be 'auto', 'none' or an existing checkpoint folder"),
    (["--lr", "-1"], "--lr must be > 0, got -1.0"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--data", "/nonexistent/images"], "--data must be 'digits', an existing ImageFolder root or WebDataset shards"),
    (["--img-size", "18"], "must be divisible by patch_size (4, 4)"),
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    (["--epochs", "-1"], "--epochs must be > 0, got -1.0"),
    (["--out", __file__], "is a file; --out names the run's folder"),
    (["--embed-dim", "0"], "--embed-dim must be a positive integer, got 0"),
    (["--depth", "-1"], "--depth must be a positive integer, got -1"),
    (["--compile-mode", "bogus"], "--compile-mode must be one of ("),
    (["--backend", "triton", "--device", "cpu"], "--backend triton needs a CUDA device"),
    (["--max-bad-frac", "2"], "--max-bad-frac must be in [0, 1], got 2.0"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0 seconds, got 0.0"),
    (["--decode", "gpu"], "--decode gpu decodes image files; --data digits has none"),
    (["--decode", "gpu", "--data", "/tmp", "--device", "cpu"], "--decode gpu needs a CUDA device (got none: no CUDA"),
    (["--decode", "dali"], "--decode dali decodes image files; --data digits has none"),
    (["--decode", "dali", "--data", "/tmp", "--device", "cpu"], "--decode dali needs a CUDA device (got none: no"),
    (["--data", "/nonexistent/train-{0000..0003}.tar", "--val-data", "x.tar"],
     "shard pattern '/nonexistent/train-{0000..0003}.tar' matches no file (it expands to 4 name(s)"),
    (["--data", "/nonexistent/train-{0000..0003}.tar"], "is a shard pattern: pass the held-out shards with --val-data"),
    (["--pos-embed", "sincos"], "argument --pos-embed: invalid choice: 'sincos'"),
    (["--layer-decay", "1.5"], "--layer-decay must be in (0, 1], got 1.5"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs a CUDA device"),
    (["--residual-dtype", "bfloat16"], "argument --residual-dtype: invalid choice: 'bfloat16'"),
], ids=lambda v: v[0] if isinstance(v, list) else None)
def test_bad_flags_give_clear_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "run"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_resume_none_refuses_a_used_out(pretrained, capsys):
    out, _ = pretrained
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--resume", "none", *TINY_FLAGS])
    assert "already holds checkpoints; pass --resume auto" in capsys.readouterr().err


def test_the_preset_line_says_what_changed_a_preset_value_and_a_long_warmup_warns(tmp_path, capsys):
    """The digits preset line gives a value changed since (lr scaled to the batch passed, warmup cut for a short
    run) with the preset's own and why; an explicit --warmup-steps not below --steps warns that the peak lr is never
    reached."""
    main(["--global-batch", "64", "--steps", "2", "--out", str(tmp_path / "a"), "--eval-every", "100"])
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("digits preset"))
    assert "lr=0.001 (preset 0.002, at batch 128, scaled to 64)" in line
    assert "warmup_steps=0 (preset 30, cut to steps // 10 for 2 steps)" in line and "weight_decay=0.05 " in line
    with pytest.warns(UserWarning, match=r"--warmup-steps 6 is not below --steps 2: the lr rises for the whole run, "
                                         r"to 0.33 x --lr at the last step"):
        main(["--steps", "2", "--warmup-steps", "6", "--out", str(tmp_path / "b"), "--eval-every", "100",
              *TINY_FLAGS])


def test_presets_and_explicit_flags():
    cfg, filled = resolve(TrainConfig(lr=0.5), world=1)  # digits: the small-data preset, --lr wins
    assert cfg.lr == 0.5 and "lr" not in filled
    assert (cfg.global_batch, cfg.img_size, cfg.model, cfg.patch_size) == (128, 16, "vit_tiny_patch16_224", 4)
    assert filled["global_batch"] == "preset"
    cfg, filled = resolve(TrainConfig(data="/data/imagenet"), world=8)  # a real dataset: the paper's recipe
    assert (cfg.global_batch, cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.epochs) == (4096, 3e-3, 10_000, 0.3, 300)
    assert cfg.micro_batch == 128 and cfg.steps is None and set(filled.values()) == {"recipe"}
    cfg, _ = resolve(TrainConfig(data="/data/imagenet", recipe="finetune", init="x"), world=1)
    assert (cfg.global_batch, cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.img_size) == (512, 0.01, 0.0, 500, 384)
    assert cfg.model is None  # the checkpoint decides the architecture
    cfg, _ = resolve(TrainConfig(data="/data/imagenet", global_batch=1024), world=8)  # lr given at 4096, scaled
    assert (cfg.lr, cfg.micro_batch) == (pytest.approx(3e-3 / 4, rel=1e-12), 128)
    cfg, _ = resolve(TrainConfig(data="/data/imagenet", global_batch=1024, lr=0.1), world=8)
    assert cfg.lr == 0.1
    cfg, _ = resolve(TrainConfig(global_batch=64), world=1)  # digits: the preset's lr is given at its batch 128
    assert cfg.lr == pytest.approx(2e-3 / 2, rel=1e-12)
    cfg, _ = resolve(TrainConfig(epochs=2.0), world=1)
    assert steps_for(cfg, num_train=1437).steps == math.ceil(2 * 1437 / 128)


def test_a_named_model_keeps_its_architecture_on_digits(tmp_path, capsys):
    """--model on digits trains the architecture it names: the preset's tiny ViT (patch 4, width 64, 4 blocks of 4
    heads, 16 px) is not laid over it (so400m/14 used to train with 4-pixel patches, 9216 tokens at 384 px), and
    the input size is the recipe's; the preset's batch, lr and schedule still apply. At its own size, 384 px, which
    is not whole 14-pixel patches, so400m/14 trains (its last 6 pixels dropped, as in timm; other sizes that are not
    whole patches are refused: test_bad_flags_give_clear_errors)."""
    cfg, filled = resolve(TrainConfig(model="vit_so400m_patch14_siglip_384"), world=1)
    assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (None,) * 4
    assert cfg.img_size == 224 and filled["img_size"] == "recipe"
    assert (cfg.global_batch, cfg.lr, cfg.steps) == (128, 2e-3, 500) and filled["lr"] == "preset"
    flags = ["--model", "vit_so400m_patch14_siglip_384", "--depth", "1", "--embed-dim", "32", "--num-heads", "2",
             "--steps", "1", "--global-batch", "8", "--warmup-steps", "0", "--eval-every", "100"]
    main([*flags, "--img-size", "384", "--out", str(tmp_path / "own")])
    assert "patch_size" not in next(line for line in capsys.readouterr().out.splitlines()
                                    if line.startswith("digits preset"))
    model = fastvit.create_model(f"local-dir:{tmp_path / 'own' / 'model'}", pretrained=True)
    assert model.patch_embed.patch_size == (14, 14) and model.patch_embed.grid_size == (27, 27)
    assert model.embed_dim == 32 and len(model.blocks) == 1


def test_default_workers_fit_the_cpus(monkeypatch):
    """No more loader workers by default than this rank's share of the CPUs it may run on (DataLoader warns past
    that, and a 2-core machine used to get 4), at most 4; an explicit --workers wins."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve(TrainConfig(data="/data/imagenet"), world=1)[0].workers == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve(TrainConfig(data="/data/imagenet"), world=1)[0].workers == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")  # 32 ranks on this machine: 2 CPUs each
    assert resolve(TrainConfig(data="/data/imagenet"), world=64)[0].workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "128")
    assert resolve(TrainConfig(data="/data/imagenet"), world=128)[0].workers == 1
    assert resolve(TrainConfig(data="/data/imagenet", workers=0), world=128)[0].workers == 0


def test_weight_decay_only_on_weight_matrices():
    model = fastvit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    decay, no_decay = param_groups(model, 0.1, lr=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == 0.5
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2} - {"pos_embed", "cls_token"}
    assert "blocks.0.attn.qkv.weight" in decayed and "patch_embed.proj.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_is_lambdalr_with_warmup_then_decay(kind):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupDecay(4, 12, kind))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])
    progress = [(s - 4) / 8 for s in range(4, 12)]
    expect = [1 - p if kind == "linear" else 0.5 * (1 + math.cos(math.pi * p)) for p in progress]
    assert lrs[4:] == pytest.approx([0.4 * e for e in expect])


def test_keyed_randomness_and_global_plan():
    """Uniforms are a pure function of (seed, step, position, k), equal to the scalar mix_seed; the per-rank,
    per-micro-step plan partitions each global batch of the stream."""
    from fastvit.data import GlobalSampler, keyed_uniform, micro_batch_plan, mix_seed
    u = keyed_uniform(3, 7, [0, 5, 9], 4)
    ref = [[(mix_seed(3, 7, p, k) >> 10) * 2.0 ** -53 for k in range(4)] for p in (0, 5, 9)]
    assert u.tolist() == ref and u.min() >= 0 and u.max() < 1
    assert mix_seed(0) == 0xE220A8397B1DCDAF >> 1  # splitmix64's first output from state 0 (Vigna's reference)
    assert not torch.equal(keyed_uniform(3, 8, [0], 4), u[:1]) and not torch.equal(keyed_uniform(4, 7, [0], 4), u[:1])
    sampler = GlobalSampler(10, seed=1)
    stream = [sampler.index(t) for t in range(30)]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10)) and stream[:10] != stream[10:20]
    for world, micro in ((1, 2), (2, 2), (4, 1)):
        plans = [list(micro_batch_plan(GlobalSampler(10, 1), 1, 1, 8, 3, 8, micro, world, r)) for r in range(world)]
        for step in (1, 2):
            got = sorted((i, p) for plan in plans for items in plan for i, s, p in items if s == step)
            base = 8 + (step - 1) * 8
            assert got == sorted((stream[base + p], p) for p in range(8))


def test_imagefolder_data(tmp_path):
    """--data PATH: ImageFolder train/ and val/; the random crop + flip of a sample depends only on its key."""
    import numpy as np
    from PIL import Image
    from fastvit.data import ImageFolderSource
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(6):
                pixels = (rng.random((24, 20, 3)) * 80 + 150 * c).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    source = ImageFolderSource(str(tmp_path), img_size=16, workers=0)
    assert (source.num_classes, source.num_train, len(source.test)) == (2, 12, 12)
    keyed = source.keyed(seed=0)
    a, b, c = keyed[(3, 5, 1)], keyed[(3, 5, 1)], keyed[(3, 5, 2)]
    assert a[0].shape == (3, 16, 16) and torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    assert a[1] == int(source.train_samples.labels[3]) and a[3] == []
    result = train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), steps=2, global_batch=4,
                               warmup_steps=1, workers=1, threads=1, **{k: v for k, v in TINY.items()
                                                                        if k != "global_batch"}))
    assert result["step"] == 2 and 0 <= result["top1"] <= 1
    with pytest.raises(ValueError, match="train/ and val/"):
        ImageFolderSource(str(tmp_path / "train"), img_size=16)


def test_seeds_report_mean_std_and_mfu(tmp_path, capsys):
    threads = torch.get_num_threads()
    results = main(["--out", str(tmp_path), "--seeds", "2", "--steps", "2", "--warmup-steps", "1",
                    "--peak-tflops", "0.5", "--threads", str(threads + 1), *TINY_FLAGS])
    assert torch.get_num_threads() == threads  # each run set threads + 1; main gives the caller its count back
    out = capsys.readouterr().out
    assert len(results) == 2 and "held-out top-1 over 2 seeds:" in out and " ± " in out
    preset = next(line for line in out.splitlines() if line.startswith("digits preset (flags you pass win): "))
    assert "model=vit_tiny_patch16_224" in preset and "lr=0.0005" in preset  # 2e-3 at batch 128, scaled to 32
    assert "embed_dim" not in preset and "global_batch" not in preset and "warmup_steps" not in preset  # passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_0", "seed_1", "seeds.json"]
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["top1"] == pytest.approx([100 * r["top1"] for r in results])
    assert summary["mean"] == pytest.approx(sum(summary["top1"]) / 2)
    a, b = (rows(tmp_path / s, "loss") for s in ("seed_0", "seed_1"))
    assert a[0]["loss"] != b[0]["loss"]  # different initialisation and data order
    model = fastvit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    assert a[0]["mfu"] == pytest.approx(a[0]["img_per_s"] * train_flops_per_image(model) / 0.5e12)


def test_a_checkpoint_that_cannot_be_written_keeps_the_previous_one(tmp_path):
    """A full disk, simulated by the OS: RLIMIT_FSIZE caps the size of any file this process writes (SIGXFSZ
    ignored, so a write past the cap fails with EFBIG, as a full disk fails with ENOSPC). The save at step 4 fails:
    a warning names step 2 as the newest usable checkpoint, no partial folder is left, training goes on and the
    save at step 6 (cap lifted) succeeds; a failed final save is an error."""
    import resource
    cap = 20_000  # metrics.jsonl and config.json stay below it, the checkpoint shards do not
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def disk(step, row):
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap if step == 3 else limits[0], limits[1]))

    cfg = TrainConfig(out=str(tmp_path), steps=6, warmup_steps=1, save_every=2, keep=0, eval_every=100, **TINY)
    try:
        with pytest.warns(checkpoint.CheckpointWarning) as record:
            result = train(cfg, on_step_end=disk)
        message = " ".join(str(w.message) for w in record)
        assert "step_00000004 could not be written (" in message and "File too large" in message
        assert "step_00000002 stays the newest usable checkpoint; training goes on" in message
        assert result["step"] == 6
        assert [p.name for p in checkpoint.resume_candidates(tmp_path)] == ["step_00000006", "step_00000002"]
        assert not list((tmp_path / "checkpoints").glob("*.tmp"))
        final = dataclasses.replace(cfg, out=str(tmp_path / "final"), steps=2, save_every=1)
        with pytest.raises(checkpoint.CheckpointWriteError, match="step_00000001 stays the newest usable"):
            train(final, on_step_end=lambda step, row: disk(3 if step == 1 else 0, row))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_final_model_folder_that_cannot_be_written_is_a_clear_error(tmp_path):
    """A full disk (RLIMIT_FSIZE, as above) when the finished run writes out/model: an error that says the last
    checkpoint holds the weights and a rerun writes the folder, no empty or half-written folder left; the rerun does
    write it."""
    import resource
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def disk(step, row):  # after the final checkpoint, before the model folder
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000 if step == 2 else limits[0], limits[1]))

    cfg = TrainConfig(out=str(tmp_path), steps=2, warmup_steps=1, eval_every=100, **TINY)
    try:
        with pytest.raises(checkpoint.CheckpointWriteError, match=r"the final weights could not be written to "
                                                                  r".*model \(.*File too large.*; the run's last "
                                                                  r"checkpoint holds them: rerun the same command"):
            train(cfg, on_step_end=disk)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert not (tmp_path / "model").exists()
    assert train(cfg)["step"] == 2 and (tmp_path / "model" / "model.safetensors").is_file()


def test_an_unwritable_out_is_a_setting_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "file" / "run"), "--steps", "1", *TINY_FLAGS])
    assert exit_info.value.code == 2
    assert f"error: --out {tmp_path / 'file' / 'run'} cannot be written (Not a directory); choose another --out" \
        in capsys.readouterr().err


def test_pos_embed_flags_are_stored_and_followed_by_init_and_fewshot(tmp_path, capsys):
    """--pos-embed / --pos-embed-at reach the model, config.json, a fine-tune from the checkpoint and the few-shot
    evaluator; a fine-tune cannot change them, and an impossible pair is a flag error."""
    from fastvit.restore import load_model_for_eval
    out = tmp_path / "pre"
    main(["--out", str(out), "--steps", "2", "--warmup-steps", "1", "--pos-embed", "learn_2d", "--pos-embed-at",
          "every_layer", *TINY_FLAGS])
    kwargs = checkpoint.read_config(checkpoint.step_path(out, 2))["model"]["kwargs"]
    assert (kwargs["pos_embed"], kwargs["pos_embed_at"]) == ("learn_2d", "every_layer")
    saved = checkpoint.read_tensors(checkpoint.step_path(out, 2))
    assert saved["model.pos_embed_h"].shape == (2, 4, 16) and "model.pos_embed" not in saved  # depth x grid x D/2
    model, _ = load_model_for_eval(str(out))
    assert (model.pos_embed_type, model.pos_embed_at) == ("learn_2d", "every_layer")
    from fastvit import fewshot
    assert fewshot.main(["--init", str(out), "--shots", "1", "--seeds", "1"])[1]["mean"] > 0
    train(TrainConfig(recipe="finetune", init=str(out), out=str(tmp_path / "ft"), steps=1, img_size=32,
                      global_batch=32, warmup_steps=1))
    ft = checkpoint.read_tensors(checkpoint.step_path(tmp_path / "ft", 1))
    assert ft["model.pos_embed_h"].shape == (2, 8, 16)  # resampled to the 8 x 8 grid of 32 px
    with pytest.raises(ValueError, match="--pos-embed cannot change the architecture of checkpoint"):
        train(TrainConfig(recipe="finetune", init=str(out), out=str(tmp_path / "ft2"), steps=1, pos_embed="learn"))
    with pytest.raises(ValueError, match=r"--pos-embed cannot change the architecture of .*model \(folder: "
                                         r"learn_2d, passed: learn\)"):  # the run's timm folder, out/model
        load_model_for_eval(str(out / "model"), pos_embed="learn")
    assert load_model_for_eval(str(out / "model"), pos_embed="learn_2d")[0].pos_embed_type == "learn_2d"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--pos-embed", "rel", "--pos-embed-at", "every_layer", *TINY_FLAGS])
    assert ("--pos-embed-at every_layer needs --pos-embed learn or learn_2d (position tables to add), got --pos-embed "
            "rel") in capsys.readouterr().err


def test_a_flag_passed_at_the_model_s_own_value_is_no_change(pretrained, tmp_path):
    """--pos-embed learn / --pos-embed-at stem / --patch-size at the value the run was built with (a default
    config.json does not store) resume the run, fine-tune and evaluate from it; another value is named as the
    built one."""
    from fastvit.restore import load_model_for_eval
    out, _ = pretrained
    same = ["--pos-embed", "learn", "--pos-embed-at", "stem"]
    run = tmp_path / "run"
    main(["--out", str(run), "--steps", "2", "--warmup-steps", "1", *TINY_FLAGS])
    main(["--out", str(run), "--steps", "3", "--warmup-steps", "1", *same, *TINY_FLAGS])  # resumed, not refused
    assert [r["step"] for r in rows(run, "loss")] == [1, 2, 3]
    model, _ = load_model_for_eval(str(out), pos_embed="learn", pos_embed_at="stem", patch_size=4)
    assert model.pos_embed_type == "learn"
    train(TrainConfig(recipe="finetune", init=str(out), out=str(tmp_path / "ft"), steps=1, img_size=32,
                      global_batch=32, warmup_steps=1, pos_embed="learn", patch_size=4))
    with pytest.raises(ValueError, match=r"--pos-embed cannot change the architecture of checkpoint .*\(checkpoint: "
                                         r"learn, passed: rel\)"):
        load_model_for_eval(str(out), pos_embed="rel")


def test_init_from_a_hugging_face_folder(tmp_path):
    """A transformers ViT folder (config.json and model.safetensors, as a timm folder has) is read as weights by
    fastvit.convert: fine-tuning and few-shot evaluation start from it."""
    from transformers import ViTConfig, ViTModel

    from fastvit import fewshot
    hf = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, layer_norm_eps=1e-6), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "hf")
    arch = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32",
            "--depth", "2", "--num-heads", "2"]
    result = main(["--recipe", "finetune", "--init", str(tmp_path / "hf"), "--out", str(tmp_path / "ft"), "--steps",
                   "1", "--warmup-steps", "1", "--global-batch", "32", *arch])[0]
    assert result["step"] == 1
    assert fewshot.main(["--init", str(tmp_path / "hf"), "--shots", "1", "--seeds", "1", *arch])[1]["mean"] > 0


def test_init_reads_a_hugging_face_folder_once_and_checks_its_eps(tmp_path, monkeypatch):
    """--init with a transformers folder reads its weights once (an H/14 folder is 2.5 GB; the state_dict and the
    eps check each read it before) and still warns that its LayerNorm eps is not the model's."""
    from transformers import ViTConfig, ViTModel

    from fastvit import convert, restore
    hf = ViTModel(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=128, layer_norm_eps=1e-12), add_pooling_layer=False)
    hf.save_pretrained(tmp_path / "hf")
    reads = []
    read_hf_dir = convert._read_hf_dir
    monkeypatch.setattr(convert, "_read_hf_dir", lambda path: reads.append(path) or read_hf_dir(path))
    arch = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.warns(UserWarning, match=r"layer_norm_eps=1e-12"):
        model = restore.load_pretrained(str(tmp_path / "hf"), "vit_tiny_patch16_224", arch)[0]
    assert reads == [str(tmp_path / "hf")]
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, hf.state_dict()["layers.1.mlp.fc2.weight"])


def test_default_out_under_torchrun_survives_a_restart(tmp_path, monkeypatch):
    """Without --out, a run started by torchrun is named after torchrun's run id (the same in every restart round),
    so a restarted job resumes from its own checkpoints instead of starting a new timestamped folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    flags = ["--steps", "2", "--warmup-steps", "1", "--save-every", "1", *TINY_FLAGS]
    first = main(flags)[0]
    assert first["out"] == "runs/digits-pretrain-job42"
    again = main([*flags[:1], "3", *flags[2:]])[0]  # the "restarted" job: --steps 3, same run id
    assert again["out"] == first["out"]
    steps = [r["step"] for r in rows(tmp_path / first["out"], "loss")]
    assert steps == [1, 2, 3]  # it resumed at step 2
