"""torchrun entry point of the elastic-restart tests (tests/test_train_distributed.py): one fastvit.train run whose
workers SIGKILL themselves on a schedule.

    python -m torch.distributed.run --max-restarts 3 ... tests/elastic_worker.py CONFIG_JSON KILLS_JSON

KILLS_JSON is a list of [rank, step], taken in order: the worker of that global rank dies right after that step
(after its checkpoint, if the step saves one), and the kill is marked done in the run's ``kills/`` folder first, so
the step run again after the restart goes on. (Files rather than TORCHELASTIC_RESTART_COUNT: on several nodes each
agent counts its own restarts.)"""
import json
import os
import signal
import sys
from pathlib import Path

from fastvit.config import TrainConfig
from fastvit.train import train

cfg = TrainConfig(**json.loads(sys.argv[1]))
kills = json.loads(sys.argv[2])
done = Path(cfg.out) / "kills"


def on_step_end(step, row):
    done.mkdir(parents=True, exist_ok=True)
    n = len(list(done.iterdir()))
    if n < len(kills) and kills[n] == [int(os.environ["RANK"]), step]:
        (done / str(n)).write_text(f"rank {os.environ['RANK']} after step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


train(cfg, on_step_end=on_step_end)
