"""fastvit.train on 2 gloo ranks: bitwise resume after SIGKILL (DDP and FSDP2), and results that do not depend on
how the global batch is split over ranks and accumulation steps (torchrun CLI and torch.multiprocessing).

Starting a rank costs seconds of imports on a 2-core machine, so the 2-rank runs share three launches (a module
fixture): each rank process runs its jobs one after another, a SIGKILLed run last."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastvit import checkpoint
from fastvit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, threads=1, eval_every=100)
# 6 steps with checkpoints at 3 and 6; dropout and drop-path make the saved per-rank RNG state matter
RESUME = dict(TINY, steps=6, global_batch=32, micro_batch=8, warmup_steps=2, save_every=3, dropout=0.1,
              drop_path=0.1)
SPLIT = dict(TINY, steps=3, global_batch=32, warmup_steps=1, save_every=3)
KILL_AT = 5


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, jobs):
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    for cfg, kill_at, port in jobs:
        os.environ["MASTER_PORT"] = str(port)  # a fresh process group per run

        def on_step_end(step, row, kill_at=kill_at):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        train(TrainConfig(**cfg), on_step_end=on_step_end)


def launch(world, jobs, timeout=300):
    """Run each ``(cfg, kill_at)`` of ``jobs`` in turn on ``world`` spawned ranks; returns their exit codes."""
    ctx = multiprocessing.get_context("spawn")
    jobs = [(cfg, kill_at, free_port()) for cfg, kill_at in jobs]
    procs = [ctx.Process(target=_worker, args=(r, world, jobs)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    return [p.exitcode for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per FSDP flag: a straight 6-step run, and one SIGKILLed after step 5 (last checkpoint: 3) then resumed with
    --resume auto; and a 3-step FSDP2 run of 2 ranks x 16 micro x 1 accumulation (split invariance)."""
    root = tmp_path_factory.mktemp("dist")
    out = {name: root / name for name in ("ddp_straight", "ddp_killed", "fsdp_straight", "fsdp_killed", "split")}
    ddp, fsdp = dict(RESUME, fsdp=False), dict(RESUME, fsdp=True)
    seen = {}
    seen["ddp_killed"] = launch(2, [(dict(ddp, out=str(out["ddp_straight"])), None),
                                 (dict(ddp, out=str(out["ddp_killed"])), KILL_AT)])
    seen["ddp_candidates"] = [p.name for p in checkpoint.resume_candidates(out["ddp_killed"])]
    seen["ddp_steps_before"] = max(losses(out["ddp_killed"]))
    seen["fsdp_killed"] = launch(2, [(dict(ddp, out=str(out["ddp_killed"]), resume="auto"), None),
                                      (dict(fsdp, out=str(out["fsdp_straight"])), None),
                                      (dict(fsdp, out=str(out["fsdp_killed"])), KILL_AT)])
    seen["fsdp_candidates"] = [p.name for p in checkpoint.resume_candidates(out["fsdp_killed"])]
    seen["fsdp_steps_before"] = max(losses(out["fsdp_killed"]))
    seen["last"] = launch(2, [(dict(fsdp, out=str(out["fsdp_killed"]), resume="auto"), None),
                               (dict(SPLIT, out=str(out["split"]), micro_batch=16, fsdp=True), None)])
    return out, seen


def losses(out):
    rows = map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tensors(path):
    """Model and optimizer tensors of a checkpoint (RNG and data position are compared through the losses)."""
    return {k: v for k, v in checkpoint.read_tensors(path).items() if k.split(".")[0] in ("model", "optim")}


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_sigkill_and_resume_is_bitwise_exact(runs, tmp_path, kind):
    """6 steps straight vs 5 steps, SIGKILL (last checkpoint at 3), resume to 6: steps 4-6 and the final weights
    and optimizer state are identical."""
    out, seen = runs
    killed_codes = seen[f"{kind}_killed"]
    assert killed_codes[0] == -signal.SIGKILL and killed_codes[1] != 0
    assert seen[f"{kind}_candidates"] == ["step_00000003"] and seen[f"{kind}_steps_before"] == KILL_AT
    straight, killed = out[f"{kind}_straight"], out[f"{kind}_killed"]
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in (4, 5, 6)] == [a[s] for s in (4, 5, 6)]
    ta = tensors(checkpoint.step_path(straight, 6))
    tb = tensors(checkpoint.step_path(killed, 6))
    assert ta.keys() == tb.keys() and any(k.endswith("exp_avg_sq") for k in ta)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_batch_split_invariance(runs, tmp_path):
    """Global batch 32 as 1 rank x 8 micro x 4 accumulation, 2 ranks x 8 x 2 (torchrun, DDP) and 2 ranks x 16 x 1
    (FSDP2): the same losses and weights to float tolerance, with augmentation on."""
    out, seen = runs
    assert seen["last"] == [0, 0]
    one = tmp_path / "one"
    n = torch.get_num_threads()
    train(TrainConfig(**SPLIT, out=str(one), micro_batch=8))  # in this process: a one-rank group of its own
    torch.set_num_threads(n)
    ddp = tmp_path / "ddp"
    flags = ["--steps", "3", "--global-batch", "32", "--micro-batch", "8", "--warmup-steps", "1", "--save-every", "3",
             "--eval-every", "100", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
             "--num-heads", "2", "--out", str(ddp)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "-m", "fastvit.train", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 ranks x 8 micro x 2 accumulation" in proc.stdout
    ref = tensors(checkpoint.step_path(one, 3))
    for run in (ddp, out["split"]):
        assert list(losses(run).values()) == pytest.approx(list(losses(one).values()), rel=1e-6, abs=1e-6)
        got = tensors(checkpoint.step_path(run, 3))
        # atol 1e-5: the key bias has an exactly-zero true gradient (softmax ignores it), so Adam normalises
        # float noise of ~1e-10 into steps of ~1e-6 whose sign depends on the summation order
        for key in (k for k in ref if k.startswith("model.")):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")
