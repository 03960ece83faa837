"""fastvit.train on 2 gloo ranks: bitwise resume after SIGKILL (DDP and FSDP2), and results that do not depend on
how the global batch is split over ranks and accumulation steps (torchrun CLI and torch.multiprocessing).

Starting a rank costs seconds of imports on a 2-core machine, so the 2-rank runs share three launches (a module
fixture): each rank process runs its jobs one after another, a SIGKILLed run last."""
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastvit import checkpoint
from fastvit.config import TrainConfig
from fastvit.dist import lost_a_rank
from fastvit.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, threads=1, eval_every=100)
# 6 steps with checkpoints at 3 and 6; dropout and drop-path make the saved per-rank RNG state matter
RESUME = dict(TINY, steps=6, global_batch=32, micro_batch=8, warmup_steps=2, save_every=3, dropout=0.1,
              drop_path=0.1)
SPLIT = dict(TINY, steps=3, global_batch=32, warmup_steps=1, save_every=3)
KILL_AT = 5
LAUNCH_TIMEOUT = 120  # s for all jobs of one launch (~30 s on 2 busy cores); a rank still running fails the test


def _worker(rank, world, jobs):
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    for cfg, kill_at, store in jobs:
        # a fresh group per run, met through a file: no free port to pick, so none another process can take first;
        # train() uses a group it finds and leaves it to its creator
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)

        def on_step_end(step, row, kill_at=kill_at):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        train(TrainConfig(**cfg), on_step_end=on_step_end)
        dist.barrier()
        dist.destroy_process_group()


def launch(world, jobs, folder, timeout=LAUNCH_TIMEOUT):
    """Run each ``(cfg, kill_at)`` of ``jobs`` in turn on ``world`` spawned ranks (rendezvous files in ``folder``);
    returns their exit codes, after asserting that every rank ended by itself within ``timeout`` seconds."""
    ctx = multiprocessing.get_context("spawn")
    folder.mkdir()
    jobs = [(cfg, kill_at, str(folder / f"store{i}")) for i, (cfg, kill_at) in enumerate(jobs)]
    procs = [ctx.Process(target=_worker, args=(r, world, jobs)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} were still running {timeout} s after the launch"
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
                                 (dict(ddp, out=str(out["ddp_killed"])), KILL_AT)], root / "launch1")
    seen["ddp_candidates"] = [p.name for p in checkpoint.resume_candidates(out["ddp_killed"])]
    seen["ddp_steps_before"] = max(losses(out["ddp_killed"]))
    seen["fsdp_killed"] = launch(2, [(dict(ddp, out=str(out["ddp_killed"]), resume="auto"), None),
                                      (dict(fsdp, out=str(out["fsdp_straight"])), None),
                                      (dict(fsdp, out=str(out["fsdp_killed"])), KILL_AT)], root / "launch2")
    seen["fsdp_candidates"] = [p.name for p in checkpoint.resume_candidates(out["fsdp_killed"])]
    seen["fsdp_steps_before"] = max(losses(out["fsdp_killed"]))
    seen["last"] = launch(2, [(dict(fsdp, out=str(out["fsdp_killed"]), resume="auto"), None),
                               (dict(SPLIT, out=str(out["split"]), micro_batch=16, fsdp=True), None)], root / "launch3")
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


def test_resuming_on_another_number_of_ranks_warns(runs, tmp_path):
    """A 2-rank run's checkpoint resumed by one process: it goes on from the saved step, and a warning says the
    dropout draws differ from an uninterrupted run (rank 0's RNG state is there, but not rank 1's stream)."""
    out, _ = runs
    run = tmp_path / "run"
    shutil.copytree(out["ddp_straight"], run)
    with pytest.warns(checkpoint.CheckpointWarning, match=r"saved by 2 rank\(s\) x micro-batch \d+ and is resumed "
                                                          r"on 1 rank\(s\) x micro-batch \d+: the same samples"):
        train(TrainConfig(**dict(RESUME, fsdp=False, out=str(run), steps=7, resume="auto")))
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6, 7]


def test_batch_split_invariance(runs, tmp_path):
    """Global batch 32 as 1 rank x 8 micro x 4 accumulation, 2 ranks x 8 x 2 (torchrun, DDP) and 2 ranks x 16 x 1
    (FSDP2): the same losses and weights to float tolerance, with augmentation on."""
    out, seen = runs
    assert seen["last"] == [0, 0]
    one = tmp_path / "one"
    train(TrainConfig(**SPLIT, out=str(one), micro_batch=8))  # in this process: a one-rank group of its own
    ddp = tmp_path / "ddp"
    flags = ["--steps", "3", "--global-batch", "32", "--micro-batch", "8", "--warmup-steps", "1", "--save-every", "3",
             "--eval-every", "100", "--img-size", "16", "--patch-size", "4", "--embed-dim", "32", "--depth", "2",
             "--num-heads", "2", "--out", str(ddp)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "fastvit.train", *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "2 ranks x 8 micro x 2 accumulation" in proc.stdout
    ref = tensors(checkpoint.step_path(one, 3))
    for run in (ddp, out["split"]):
        assert list(losses(run).values()) == pytest.approx(list(losses(one).values()), rel=1e-6, abs=1e-6)
        got = tensors(checkpoint.step_path(run, 3))
        # atol 1e-5: where a true gradient is (near) zero, Adam's eps-normalised step turns summation-order noise
        # into weight differences of ~1e-6, not only in the key bias (softmax ignores it): measured maxima
        # 1.5e-6 in blocks.0.mlp.fc1.weight, 8.7e-7 in the key bias, 3e-9 in the query/value biases
        for key in (k for k in ref if k.startswith("model.")):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


# [rank, step], in order: rank 1 dies after step 3 (last checkpoint 2), rank 0 after 5 (checkpoint 4), rank 1 after
# the final step 6 (checkpoint 6 written: the last round only evaluates and exits)
ELASTIC_KILLS = [[1, 3], [0, 5], [1, 6]]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_finishes_as_uninterrupted(runs, run, log):
    """Resumed from checkpoints 2, 4 and 6 (one per kill), and the uninterrupted run's losses, weights and
    optimizer state, bit for bit."""
    out, _ = runs
    # sorted: on two nodes, rank 0 (which prints) may move between the agents' logs
    resumed = sorted(line.split("checkpoints/")[1] for line in log.splitlines() if line.startswith("resumed from"))
    assert resumed == ["step_00000002 (step 2)", "step_00000004 (step 4)", "step_00000006 (step 6)"], log[-4000:]
    assert len(list((run / "kills").iterdir())) == len(ELASTIC_KILLS)
    assert "connectFullMesh" not in log
    straight = out["ddp_straight"]
    a, b = losses(straight), losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5, 6] and [b[s] for s in sorted(b)] == [a[s] for s in sorted(a)]
    ta, tb = tensors(checkpoint.step_path(straight, 6)), tensors(checkpoint.step_path(run, 6))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def _elastic_command(run):
    cfg = dict(RESUME, save_every=2, out=str(run))
    return [str(ROOT / "tests" / "elastic_worker.py"), json.dumps(cfg), json.dumps(ELASTIC_KILLS)]


def test_torchrun_restarts_after_sigkill_and_finishes_bitwise(runs, tmp_path):
    """torchrun --max-restarts 3, a worker SIGKILLed in each of three rounds: every restart meets the others (no
    stale rendezvous keys from the killed round), resumes from the newest checkpoint, and the run ends with the
    uninterrupted run's losses, weights and optimizer state, bit for bit."""
    run = tmp_path / "elastic"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--max-restarts", "3", "--monitor-interval", "0.2", *_elastic_command(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * LAUNCH_TIMEOUT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    _assert_finishes_as_uninterrupted(runs, run, proc.stdout)


@pytest.mark.parametrize("shared_store", [True, False], ids=["agent_store", "store_per_round"])
def test_two_node_restarts_after_sigkill_and_finish_bitwise(runs, tmp_path, shared_store):
    """The same three kills on two torchrun agents ("nodes", one worker each) meeting through a c10d rendezvous:
    the agent of the killed worker restarts it and counts a restart, the other agent restarts its own to meet it
    without counting, and the run ends as the uninterrupted one. Both ways torchrun may hand the workers a store:
    the agents' shared one (the default, where fastvit's round store separates the rounds) and a fresh one per
    round (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, where ``env://`` runs as it comes)."""
    run = tmp_path / "two_nodes"
    port = _free_port()
    env = dict(os.environ)
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    if not shared_store:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
                                "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id",
                                "fastvit-test", "--max-restarts", "3", "--monitor-interval", "0.2",
                                *_elastic_command(run)],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=4 * LAUNCH_TIMEOUT))
    finally:
        for agent in agents:
            agent.kill()
    log = "\n".join(out + err for out, err in logs)
    assert [a.returncode for a in agents] == [0, 0], log[-6000:]
    _assert_finishes_as_uninterrupted(runs, run, "\n".join(out for out, _ in logs))


def test_a_failing_rank_ends_the_job(tmp_path):
    """A rank that raises leaves the process group without a barrier, so torchrun sees it fail and stops the
    others (a barrier there would wait for ranks that are blocked in a collective: a hang)."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from fastvit.dist import distributed\n"
        "with distributed(device='cpu') as env:\n"
        "    if env.rank == 1:\n"
        "        raise RuntimeError('rank 1 fails')\n"
        "    dist.all_reduce(torch.ones(1))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=ROOT, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode != 0 and "rank 1 fails" in proc.stderr


def _lose_rank_1(rank, store, results):
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    dist.all_reduce(torch.ones(1))
    if rank == 1:
        os._exit(1)  # a crash: no goodbye to the group
    try:
        for _ in range(400):
            dist.all_reduce(torch.ones(1))
            time.sleep(0.05)
        results.put("no error")
    except RuntimeError as e:
        results.put(lost_a_rank(e))


def test_a_lost_rank_is_recognised_in_a_collective_s_error(tmp_path):
    """The error a survivor's collective raises when another rank dies is told apart (fastvit.train then prints one
    line instead of the collective's traceback); other RuntimeErrors are not."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_lose_rank_1, args=(r, str(tmp_path / "store"), results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        said = results.get(timeout=LAUNCH_TIMEOUT)
    finally:
        for p in procs:
            p.join(10)
            p.kill()
    assert said not in (None, "no error") and "peer" in said and "\n" not in said
    assert lost_a_rank(RuntimeError("CUDA out of memory")) is None and lost_a_rank(ValueError("peer")) is None


def test_round_store_skips_the_previous_rounds_announcement(monkeypatch, capfd):
    """Rank 1 reads the killed round's announcement (a store whose host is gone) before rank 0 of the new round
    announces its own: it keeps reading until it reaches a store that answers with the announced token, and both
    ranks then share that store, without a C++ connection error in the log; a rank that never finds one fails
    within its timeout, naming the wait."""
    import threading

    from fastvit import dist as fdist
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    agent = dist.TCPStore("127.0.0.1", int(os.environ["MASTER_PORT"]), 2, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=30))
    agent.set("fastvit/round_store", json.dumps(["127.0.0.1", _free_port(), "old-token"]))  # nothing listens there
    got = {}
    reader = threading.Thread(target=lambda: got.update(
        store=fdist.round_store(agent, 1, 2, timedelta(seconds=30), probe_s=0.5)))
    reader.start()
    time.sleep(1.5)  # rank 1 has probed the stale announcement by now
    assert reader.is_alive()
    store = fdist.round_store(agent, 0, 2, timedelta(seconds=30))
    reader.join(30)
    assert not reader.is_alive() and "store" in got
    store.set("from rank 0", "hello")
    assert got["store"].get("from rank 0") == b"hello"
    assert json.loads(agent.get("fastvit/round_store"))[1:] == [store.port, store.get("fastvit/token").decode()]
    assert "socket" not in capfd.readouterr().err  # TCPStore's "client socket has timed out" lines and stacks

    agent.set("fastvit/round_store", json.dumps(["127.0.0.1", _free_port(), "old-token"]))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 found no store of this restart round.*--dist-timeout"):
        fdist.round_store(agent, 1, 2, timedelta(seconds=2), probe_s=0.5)
    assert time.monotonic() - t0 < 10
