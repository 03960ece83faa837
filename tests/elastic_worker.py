"""torchrun entry point of the elastic-restart test (tests/test_train_distributed.py): one fastvit.train run whose
workers SIGKILL themselves on a schedule, at most one kill per restart round.

    python -m torch.distributed.run --max-restarts 3 ... tests/elastic_worker.py CONFIG_JSON KILLS_JSON

KILLS_JSON maps a restart round (TORCHELASTIC_RESTART_COUNT) to [rank, step]: that rank dies right after that step
(after its checkpoint, if the step saves one)."""
import json
import os
import signal
import sys

from fastvit.config import TrainConfig
from fastvit.train import train

cfg = TrainConfig(**json.loads(sys.argv[1]))
victim = json.loads(sys.argv[2]).get(os.environ["TORCHELASTIC_RESTART_COUNT"])


def on_step_end(step, row):
    if victim == [int(os.environ["RANK"]), step]:
        os.kill(os.getpid(), signal.SIGKILL)


train(cfg, on_step_end=on_step_end)
