"""Pre-training and fine-tuning with the ViT paper's recipes, on one process or many (torchrun), DDP or FSDP2.

    python -m fastvit.train                      # digits preset: a tiny ViT, ~99% held-out top-1 in < 3 min on CPU
    torchrun --nproc_per_node 8 --max-restarts 3 -m fastvit.train --data /data/imagenet-wds --fsdp --out runs/b16
    python -m fastvit.train --recipe finetune --init runs/pre --data /data/imagenet --img-size 384

This module is the run loop; options and recipes live in ``fastvit.config`` and ``fastvit.recipes``, process groups in
``fastvit.dist``, data in ``fastvit.data``, checkpoints in ``fastvit.checkpoint``.

Global batch = ranks x micro-batch x accumulation steps; each micro-batch loss is scaled so the gradient is the mean
over the global batch, and augmentation randomness is keyed by (seed, step, sample position) (``fastvit.data``), so
how the batch is split does not change the result. Unreadable samples are replaced by keyed substitutes and counted
(``bad_samples``); the run stops once they exceed ``--max-bad-frac``. Under ``torchrun --max-restarts N`` a job whose
worker dies restarts and resumes from the newest complete checkpoint (``--resume auto``, the default).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

import fastvit
from fastvit import checkpoint
from fastvit.config import (ARCH_FLAGS, DIGITS_PRESET, RECIPE_DEFAULTS, TrainConfig, build_parser, check,
                            cpus_per_local_rank, plural, resolve, short_warnings, steps_for)
from fastvit.data.choose import make_source
from fastvit.data.keyed import micro_batch_plan, mix_seed
from fastvit.data.shards import is_shard_spec, shard_files
from fastvit.data.sources import BadSampleWarning, DataError, eval_batches, progress
from fastvit.dist import (Env, device_and_backend, distributed, from_rank0, keep_thread_count, lost_a_rank,
                          rank0_print, rank0_warnings)
from fastvit.flops import peak_flops, train_flops_per_image
from fastvit.metrics import MetricsLog, plot_curves
from fastvit.recipes import WarmupDecay, make_optimizer, make_scheduler, param_groups
from fastvit.restore import architecture, check_whole_patches, load_pretrained


def model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """``create_model`` keywords for a fresh model; stored in config.json so a checkpoint can rebuild it."""
    kwargs = dict(num_classes=num_classes, img_size=cfg.img_size, proj_drop_rate=cfg.dropout,
                  pos_drop_rate=cfg.dropout, drop_path_rate=cfg.drop_path, backend=cfg.backend,
                  residual_dtype=cfg.residual_dtype)
    kwargs.update({k: getattr(cfg, k) for k in ARCH_FLAGS if getattr(cfg, k) is not None})
    return kwargs


def default_out(cfg: TrainConfig) -> str:
    """runs/<data>-<recipe>-<time>, with rank 0's clock on every rank (collective); under torchrun
    runs/<data>-<recipe>-<run id>, the same after a restart, so the restarted job resumes from its checkpoints."""
    name = "digits" if cfg.data == "digits" else Path(cfg.data.split("{")[0].rstrip("-_/") or cfg.data).name
    tag = os.environ.get("TORCHELASTIC_RUN_ID") or f"{datetime.now():%Y%m%d-%H%M%S}"
    return from_rank0(f"runs/{name}-{cfg.recipe}-{tag}")


class BadSampleLimit(DataError):
    """More unreadable samples than --max-bad-frac allows, found by every rank at once (the step's counts are
    summed over ranks), so all of them can save before stopping."""


class _StopRequest:
    """Records SIGTERM or Ctrl-C (SIGINT) so the run saves a checkpoint at the end of the current step and exits;
    a second Ctrl-C interrupts at once (the default handler is back after the first). ``announce``: say so at the
    first Ctrl-C (rank 0 only: a terminal's Ctrl-C reaches every rank of a torchrun job)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, announce: bool = True):
        self.requested = None  # the name of the signal that asked to stop
        self.announce = announce
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous[signum])
            if self.announce:
                print("\nCtrl-C: saving a checkpoint at the end of this step (again to stop at once)",
                      file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _clone(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clone(v) for v in tree]
    return tree


class Run:
    """One training run: data, model, optimizer and schedule built from a config; ``fit()`` trains it."""

    def __init__(self, cfg: TrainConfig, env: Env, resume_hint: str | None = None):
        """``resume_hint``: how to resume the run after a stop request, for the message (default: the same command
        with its --out; a caller running several runs names its own command, "" says nothing)."""
        self.env, self.resume_hint = env, resume_hint
        cfg, filled = resolve(cfg, env.world)
        check(cfg, env.world)
        with rank0_warnings(env):
            self.data = make_source(cfg.data, cfg.img_size, workers=cfg.workers, val_data=cfg.val_data,
                                    decode=cfg.decode, device=env.device)
        cfg = steps_for(cfg, self.data.num_train)
        why = {}  # preset values changed since, and why (the preset line says both)
        if filled.get("lr") == "preset" and "global_batch" not in filled:
            why["lr"] = f"at batch {DIGITS_PRESET[cfg.recipe]['global_batch']}, scaled to {cfg.global_batch}"
        if filled.get("warmup_steps") and cfg.warmup_steps >= cfg.steps:  # a default warmup longer than the run
            cfg = dataclasses.replace(cfg, warmup_steps=cfg.steps // 10)
            why["warmup_steps"] = f"cut to steps // 10 for {plural(cfg.steps, 'step')}"
        elif not filled.get("warmup_steps") and cfg.warmup_steps >= cfg.steps and env.rank == 0:
            warnings.warn(f"--warmup-steps {cfg.warmup_steps} is not below --steps {cfg.steps}: the lr rises for "
                          f"the whole run, to {cfg.steps / cfg.warmup_steps:.2g} x --lr at the last step, and never "
                          f"decays", stacklevel=2)
        if env.device.type == "cpu" and (cfg.threads or "OMP_NUM_THREADS" not in os.environ):
            torch.set_num_threads(cfg.threads or cpus_per_local_rank(env.world))
        self.cfg, self.model_named = cfg, cfg.model is not None and "model" not in filled  # --model given
        if cfg.out is None:
            self.cfg = cfg = dataclasses.replace(cfg, out=default_out(cfg))
        self.out = Path(cfg.out)
        if filled.get("warmup_steps"):
            resumed = self._resumed_warmup(cfg)
            if resumed.warmup_steps != cfg.warmup_steps:
                why["warmup_steps"] = "as the run being resumed had it"
            self.cfg = cfg = resumed
        self.accum = cfg.global_batch // (env.world * cfg.micro_batch)
        table = DIGITS_PRESET.get(cfg.recipe, {})
        preset = [f"{k}={getattr(cfg, k)}" + (f" (preset {table[k]}, {why[k]})" if k in why and getattr(cfg, k) !=
                                              table[k] else "") for k, source in filled.items() if source == "preset"]
        if preset:
            rank0_print(env, "digits preset (flags you pass win): " + " ".join(preset))
        self._build_model()
        self.bad_total = 0  # unreadable samples drawn so far, all ranks (restored on resume)
        self._make_out()
        self.start, self.samples_seen, self.resumed_from = self.resume()
        rank0_print(env, f"{cfg.recipe}: {self._model_description()} on {env.world} x {env.device.type}; "
                          f"global batch {cfg.global_batch} = {plural(env.world, 'rank')} x {cfg.micro_batch} micro x "
                          f"{self.accum} accumulation; {plural(cfg.steps, 'step')}, lr {cfg.lr:g}, warmup "
                          f"{cfg.warmup_steps}, {cfg.schedule} decay; out {self.out}")
        if cfg.global_batch > self.data.num_train and env.rank == 0:
            warnings.warn(f"--global-batch {cfg.global_batch} is larger than the training set "
                          f"({self.data.num_train} images): each step passes over it "
                          f"{cfg.global_batch / self.data.num_train:.1f} times; a small dataset wants a smaller "
                          f"--global-batch (and --model)", stacklevel=2)

    def _make_out(self):
        """Create --out (collective): one that cannot be written (read-only, under a file) is a setting error on
        every rank before anything runs, not a traceback at the first write."""
        problem = None
        if self.env.rank == 0:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
                probe = self.out / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                problem = f"--out {self.out} cannot be written ({e.strerror or e}); choose another --out"
        problem = from_rank0(problem)
        if problem:
            raise ValueError(problem)

    def _model_description(self):
        """'vit_base_patch16_224 with embed_dim 32, depth 2 (32,554 params)': the name and what the flags changed."""
        own, built = architecture(self.model_name, {}), architecture(self.model_name, self.model_kwargs)
        changed = [f"{k} {v}" for k, v in built.items() if k in ARCH_FLAGS and v != own[k]]
        return (f"{self.model_name}{' with ' + ', '.join(changed) if changed else ''} "
                f"({sum(p.numel() for p in self.core.parameters()):,} params{', FSDP2' if self.cfg.fsdp else ''})")

    def _build_model(self):
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        kwargs = model_kwargs(cfg, self.data.num_classes)
        if cfg.init:
            model, self.model_name, kwargs = load_pretrained(cfg.init, cfg.model or RECIPE_DEFAULTS[cfg.recipe]
                                                             ["model"], kwargs, name_given=self.model_named)
            done = []
            grid = tuple(model.patch_embed.grid_size)
            if tuple(model.patch_embed.img_size) != (cfg.img_size, cfg.img_size):
                model.set_input_size(img_size=cfg.img_size)
                new_grid = tuple(model.patch_embed.grid_size)
                if new_grid != grid:  # a table per position, or per offset (rel); none to resample without
                    kind = {"none": None, "rel": "relative position bias"}.get(model.pos_embed_type, "position table")
                    done.append(f"{kind} resampled from {grid[0]}x{grid[1]} to {new_grid[0]}x{new_grid[1]} patches"
                                if kind else f"a new grid of {new_grid[0]}x{new_grid[1]} patches (no position "
                                             f"table to resample)")
            # fine-tuning replaces the head (the paper's zero D x K layer); a pre-training warm start keeps one that
            # fits
            if cfg.recipe == "finetune" or model.num_classes != self.data.num_classes:
                model.reset_classifier(self.data.num_classes)
                done.append(f"new zero-initialised head ({self.data.num_classes} classes)")
            else:
                done.append(f"its head kept ({model.num_classes} classes)")
            rank0_print(self.env, f"--init {cfg.init}: {'; '.join(done)}")
            kwargs.update(img_size=cfg.img_size, num_classes=self.data.num_classes)
        else:
            self.model_name = cfg.model
            model = fastvit.create_model(cfg.model, **kwargs)
        check_whole_patches(model)
        self.model_kwargs = kwargs
        model.to(env.device)
        self.core = model
        if cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(env.device.type, (env.world,))
            for block in model.blocks:
                # a sharded block carries FSDP's hooks, so the model calls it as a module (fastvit.surgery.runs_unmodified)
                fully_shard(block, mesh=mesh)
            self.model = fully_shard(model, mesh=mesh)
        elif env.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        else:
            self.model = model
        if cfg.compile or cfg.compile_mode or cfg.cuda_graphs:  # training forward and backward; evaluation eager
            self.model = torch.compile(self.model, mode="reduce-overhead" if cfg.cuda_graphs else cfg.compile_mode)
            rank0_print(env, "torch.compile: the first step compiles the training step (a minute or more)")
        self.optimizer = make_optimizer(cfg.recipe, self.core, cfg.lr, cfg.weight_decay, cfg.layer_decay,
                                        fused=cfg.cuda_graphs)
        self.scheduler = make_scheduler(self.optimizer, cfg.warmup_steps, cfg.steps, cfg.schedule)
        self.train_flops = train_flops_per_image(self.core)
        self.peak = peak_flops(env.device, cfg.peak_tflops)

    # -- state ------------------------------------------------------------------------------------------------
    def _state(self, step, samples_seen, bad_samples=0):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, f"rng/rank{self.env.rank}": self._rng_state(),
                "trainer": {"step": step, "samples_seen": samples_seen, "bad_samples": bad_samples,
                            "scheduler": self.scheduler.state_dict(),
                            "world": self.env.world, "global_batch": self.cfg.global_batch}}

    def _rng_state(self) -> dict:
        """This rank's dropout / drop-path generators."""
        rng = {"cpu": torch.get_rng_state()}
        if self.env.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.env.device)
        return rng

    def _set_rng_state(self, rng: dict):
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.env.device)

    def _config_json(self):
        return {"train": dataclasses.asdict(self.cfg), "model": {"name": self.model_name, "kwargs": self.model_kwargs},
                "data": {"train_samples": self.data.num_train, "train_fingerprint": self.data.fingerprint()}}

    def save(self, step, samples_seen, final=False):
        """Write a checkpoint. A write that fails (a full disk) leaves the previous checkpoint the newest usable one;
        mid-run it is reported and training goes on (the next save may succeed), at the end of a run it is an error."""
        try:
            checkpoint.save(self.out, step, self._state(step, samples_seen, self.bad_total), self._config_json(),
                            self.cfg.keep)
            return True
        except checkpoint.CheckpointWriteError as e:
            if final:
                raise
            if self.env.rank == 0:
                warnings.warn(f"{e}; training goes on", checkpoint.CheckpointWarning)
            return False

    def _load(self, path) -> tuple[int, int, int]:
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = _clone(self._state(0, 0))  # load into copies: a failed load leaves the live model untouched
        rng_key = f"rng/rank{self.env.rank}"
        if not any(k.startswith(rng_key + ".") for k in checkpoint.saved_keys(path)):
            del state[rng_key]  # saved by fewer ranks than this run has
        checkpoint.load(path, state)
        saved = (int(state["trainer"]["world"]), self._saved_micro_batch(path))
        now = (self.env.world, self.cfg.micro_batch)
        if saved[0] != now[0] or saved[1] not in (None, now[1]):  # another split of each global batch
            if self.env.rank == 0:
                split = "{} rank(s) x micro-batch {}"
                warnings.warn(f"{path} was saved by {split.format(*saved)} and is resumed on {split.format(*now)}: "
                              f"the same samples, but other dropout draws and another order of summation than an "
                              f"uninterrupted run", checkpoint.CheckpointWarning)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.scheduler.load_state_dict(state["trainer"]["scheduler"])
        self._follow_flags()
        if rng_key in state:
            self._set_rng_state(state[rng_key])
        trainer = state["trainer"]
        return int(trainer["step"]), int(trainer["samples_seen"]), int(trainer["bad_samples"])

    @staticmethod
    def _saved_micro_batch(path):
        """The --micro-batch a checkpoint was saved with, from the config.json beside it (None where unreadable)."""
        try:
            return int(checkpoint.read_config(path)["train"]["micro_batch"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _resumed_warmup(self, cfg):
        """A default --warmup-steps goes on as the run being resumed had it: the default is cut to steps // 10 for a
        run shorter than it, so a resume with more --steps would otherwise restart the warmup part-way."""
        if cfg.resume == "none" or not checkpoint.resume_candidates(self.out, warn=False):
            return cfg
        try:
            saved = checkpoint.read_config(self.out)["train"]["warmup_steps"]
        except (OSError, ValueError, KeyError, TypeError):
            return cfg
        return cfg if saved is None else dataclasses.replace(cfg, warmup_steps=int(saved))

    def _follow_flags(self):
        """After a restore, take lr, schedule and weight decay from this run's flags (a resumed run may extend
        --steps): the same flags give bitwise the same values, changed ones apply from the next step."""
        cfg, groups = self.cfg, self.optimizer.param_groups
        fn = WarmupDecay(cfg.warmup_steps, cfg.steps, cfg.schedule)
        fresh = param_groups(self.core, cfg.weight_decay, cfg.lr, cfg.layer_decay)
        if [len(g["params"]) for g in fresh] != [len(g["params"]) for g in groups]:
            raise ValueError(f"--layer-decay {cfg.layer_decay} groups the parameters differently from the run being "
                             f"resumed; resume with the --layer-decay it was started with")
        self.scheduler.lr_lambdas = [fn] * len(groups)
        self.scheduler.base_lrs = [g["lr"] for g in fresh]
        for group, new in zip(groups, fresh):
            group["initial_lr"], group["lr"] = new["lr"], new["lr"] * fn(self.scheduler.last_epoch)
            group["weight_decay"], group["lr_scale"] = new["weight_decay"], new["lr_scale"]
        self.scheduler._last_lr = [group["lr"] for group in groups]

    def resume(self):
        """Restore the latest usable checkpoint per --resume; sets the count of unreadable samples drawn and returns
        (step, samples_seen, path or None)."""
        cfg, env = self.cfg, self.env
        if cfg.resume == "none":
            if checkpoint.resume_candidates(self.out, warn=False):
                raise ValueError(f"--out {self.out} already holds checkpoints; pass --resume auto to continue that "
                                 f"run or choose another --out")
            return 0, 0, None
        explicit = cfg.resume != "auto"
        candidates = [Path(cfg.resume)] if explicit else checkpoint.resume_candidates(self.out, warn=env.rank == 0)
        if candidates:
            self._check_same_run(Path(cfg.resume) if explicit else self.out)
        for path in candidates:
            try:
                if explicit:  # a checkpoint folder, or a run folder's newest complete checkpoint
                    path = checkpoint.find_checkpoint(path)
                step, seen, self.bad_total = self._load(path)
            except checkpoint.IncompatibleCheckpointError as e:  # readable, not this run's: never a fresh start
                raise ValueError(f"checkpoint {path} does not fit this run ({e}): another --recipe or --layer-decay "
                                 f"than the run was started with? Resume with its flags, or choose another --out"
                                 ) from e
            except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
                reason = checkpoint.failure_reason(e)
                if explicit:
                    raise ValueError(f"--resume {path}: cannot load it ({reason})") from e
                if env.rank == 0:
                    warnings.warn(f"skipping checkpoint {path}: loading failed ({reason})",
                                  checkpoint.CheckpointWarning)
                continue
            if step > cfg.steps:
                raise ValueError(f"--steps {cfg.steps} is below step {step} of the checkpoint this run resumes "
                                 f"({path}); pass --steps {step} or more to go on with it, or another --out")
            rank0_print(env, f"resumed from {path} (step {step})")
            if explicit and env.rank == 0:  # an older checkpoint than --out's newest: say what happens to the rest
                newer = [checkpoint.checkpoint_step(p) for p in checkpoint.resume_candidates(self.out, warn=False)]
                if newer and newer[0] > step:
                    warnings.warn(f"{self.out} holds checkpoints up to step {newer[0]}: they stay until this run "
                                  f"saves over them (--resume auto before then takes the newest of them), and "
                                  f"metrics.jsonl keeps its rows up to step {step}", checkpoint.CheckpointWarning)
            return step, seen, path
        self.optimizer.state.clear()  # get_state_dict() initialised it for the load template
        return 0, 0, None

    def _check_same_run(self, folder):
        """Refuse to resume from ``folder`` (--out, or the run or checkpoint folder --resume names) where its
        config.json describes another model, data stream or optimizer (another architecture, --data, --val-data,
        --seed, --recipe, or --layer-decay given or left out): its checkpoints would be skipped or continued as if
        they were this run's. Schedule flags (--steps, --lr, --layer-decay's value, ...) may change on resume
        (``_follow_flags``)."""
        try:
            old = checkpoint.read_config(folder)
        except (OSError, ValueError):
            return
        new = json.loads(json.dumps(self._config_json()))  # tuples as lists, as config.json holds them
        old_model = old.get("model", {})
        fields = {"model": (old_model.get("name"), new["model"]["name"])}
        if fields["model"][0] == fields["model"][1]:  # the same model: what each run's options build
            built = [architecture(m["name"], m.get("kwargs", {})) for m in (old_model, new["model"])]
            fields.update({k: (built[0][k], built[1][k]) for k in built[0]})
        fields.update({f"--{k.replace('_', '-')}": (old.get("train", {}).get(k), new["train"][k])
                       for k in ("data", "val_data", "seed", "recipe")})
        # the optimizer's parameter groups: one per depth with --layer-decay, whatever its value
        decay = old.get("train", {}).get("layer_decay"), new["train"]["layer_decay"]
        if (decay[0] is None) != (decay[1] is None):
            fields["--layer-decay"] = decay
        for k in ("--data", "--val-data"):  # the same folder however it is written ('wds', 'wds/', '/abs/wds')
            a, b = fields[k]
            if a and b and a != "digits" and os.path.realpath(a) == os.path.realpath(b):
                fields[k] = (b, b)
        specs = [(fields["--data"][i], fields["--val-data"][i]) for i in (0, 1)]
        if specs[0] != specs[1] and specs[0][0]:  # the same shards named as a folder and as a pattern are the same
            files = shard_files(*specs[0])
            if files is not None and files == shard_files(*specs[1]):
                fields["--data"] = fields["--val-data"] = (None, None)
        changed = [k for k, (a, b) in fields.items() if a != b]
        if changed:
            where = f"--out {self.out}" if folder == self.out else f"--resume {folder}"
            advice = "choose another --out" if folder == self.out else "pass a checkpoint of this run to --resume"
            if all(k.startswith("--") for k in changed):  # the same model: its weights can start a new run
                advice += f", or start from its weights with --init {folder}"
            changes = "; ".join(f"{k} {fields[k][0]!r} -> {fields[k][1]!r}" for k in changed)
            raise ValueError(f"{where} holds checkpoints of another run ({changes}); {advice}")
        data = old.get("data", {})  # absent from runs saved before 2026-12-05; the fingerprint before 2026-12-06
        before, fingerprint_before = data.get("train_samples"), data.get("train_fingerprint")
        if self.env.rank != 0:
            return
        if before is not None and before != self.data.num_train:
            what = f"was trained on {before} training samples and --data now holds {self.data.num_train}"
        elif fingerprint_before is not None and fingerprint_before != self.data.fingerprint():
            what = (f"was trained on other samples than --data now holds (as many, {before}, but other files, labels "
                    f"or shards)")
        else:
            return
        warnings.warn(f"the run in {folder} {what}: it resumes, but the samples it draws from here on differ from "
                      f"those of an uninterrupted run", checkpoint.CheckpointWarning)

    # -- evaluation -------------------------------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast per --precision (auto: on CUDA only)."""
        device = self.env.device.type
        if self.cfg.precision == "bf16" or (self.cfg.precision == "auto" and device == "cuda"):
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Top-1 on the held-out split, sharded over ranks; None where none of its images could be read (each one
        named in a warning as it was read)."""
        self.core.eval()
        counts = torch.zeros(2, dtype=torch.float64)
        for x, y, valid in eval_batches(self.data.test, 2 * self.cfg.micro_batch, self.env.world, self.env.rank,
                                        self.data.eval_workers(self.cfg.workers), desc="eval"):
            with self._autocast():
                pred = self.core(x.to(self.env.device, non_blocking=True)).argmax(1).cpu()
            valid = valid & (y >= 0)  # label -1: an unreadable image, left out
            counts += torch.tensor([((pred == y) & valid).sum().item(), valid.sum().item()], dtype=torch.float64)
        self.core.train()
        counts = counts.to(self.env.device)
        dist.all_reduce(counts)
        if not counts[1]:
            return None
        return (counts[0] / counts[1]).item()

    def _plain_model(self):
        """The model without sharding (FSDP2: a full copy built from the gathered state dict)."""
        if not self.cfg.fsdp:
            return self.core
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        model = fastvit.create_model(self.model_name, **self.model_kwargs).to(self.env.device)
        model.load_state_dict(full)
        return model

    # -- training ---------------------------------------------------------------------------------------------
    def _sync_grads(self, enabled: bool):
        """Gradient reduction only on the last micro-batch of a step."""
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if not enabled and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _step(self, batches, stop: _StopRequest, step: int, seen: int):
        """Forward/backward over the accumulation steps, then clip and update; returns (loss, grad norm, stop).
        ``seen``: samples drawn before this step (for the unreadable-sample limit)."""
        cfg, dev = self.cfg, self.env.device
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        bad = 0
        for j in range(self.accum):
            x, y, replaced = next(batches)
            for name, reason in replaced:
                warnings.warn(f"unreadable sample {name} ({reason}); replaced by a keyed substitute", BadSampleWarning)
            bad += len(replaced)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            with self._sync_grads(j == self.accum - 1):
                with self._autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                # mean over the global batch: DDP/FSDP average over ranks, so scale by micro*ranks/global = 1/accum
                (loss / self.accum).backward()
            loss_sum += loss.detach().double() * len(y)
        asked = float(stop.requested is not None)
        stats = torch.stack([loss_sum, torch.tensor(asked, device=dev, dtype=torch.float64),
                             torch.tensor(float(bad), device=dev, dtype=torch.float64)])
        dist.all_reduce(stats)
        loss = (stats[0] / cfg.global_batch).item()
        self._count_bad(int(stats[2].item()), seen + cfg.global_batch)
        norm = torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.clip_grad if cfg.clip_grad > 0 else
                                              float("inf"))
        norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            # a checkpoint of step j holds the weights step j + 1 ran on: those before this step gave finite ones
            saved = checkpoint.resume_candidates(self.out, warn=False)
            good = [p for p in saved if checkpoint.checkpoint_step(p) < step]
            these = f" The newest checkpoint, {saved[0]}, holds the weights that gave it." if saved[:1] != good[:1] \
                else ""
            advice = (f"resume from it with --resume {good[0]} and a lower --lr or more --warmup-steps" if good
                      else "start again with a lower --lr or more --warmup-steps")
            raise FloatingPointError(
                f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step + 1} "
                f"(loss {loss}, grad norm {norm}); stopping without saving.{these} The last good checkpoint is "
                f"{good[0] if good else 'none'}: {advice}.")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, norm, bool(stats[1].item() > 0)

    def _count_bad(self, bad: int, drawn: int):
        """Add a step's unreadable samples (all ranks) and stop once they exceed --max-bad-frac x max(samples
        drawn, training-set size): a few bad files never stop a run, a broken dataset stops it early."""
        total = self.bad_total + bad
        limit = self.cfg.max_bad_frac * max(drawn, self.data.num_train)
        if total > limit:
            self.optimizer.zero_grad(set_to_none=True)
            many = total != 1
            raise BadSampleLimit(f"{total} unreadable sample{'s' * many} among the {drawn} drawn so far "
                            f"exceed{'s' * (not many)} --max-bad-frac "
                            f"{self.cfg.max_bad_frac:g} x max(drawn, training-set size {self.data.num_train}) = "
                            f"{limit:g}; the warnings above name them. Repair or remove them{self._verify_hint()}, "
                            f"or raise --max-bad-frac")
        self.bad_total = total

    def _verify_hint(self) -> str:
        """For shards, the command that lists every undecodable sample (an image folder has none: its files are
        named in the warnings)."""
        if not is_shard_spec(self.cfg.data):
            return ""
        folder = self.cfg.data if os.path.isdir(self.cfg.data) else "DST"
        return f" (python -m fastvit.data.shards --verify {folder} lists every undecodable sample)"

    def fit(self, on_step_end=None) -> dict:
        """Train to cfg.steps (resuming per --resume) and return the final metrics.

        ``on_step_end(step, row)`` is called on every rank after each step (and its checkpoint, if any)."""
        cfg, env = self.cfg, self.env
        start, seen, resumed_from = self.start, self.samples_seen, self.resumed_from
        if env.rank == 0:
            checkpoint.remove_incomplete(self.out)
            checkpoint.write_config(self.out, self._config_json())
        if resumed_from is None:
            torch.manual_seed(mix_seed(cfg.seed, env.rank, 0xD70))  # dropout / drop-path stream of this rank
        log = MetricsLog(self.out / "metrics.jsonl", env.rank == 0, start if resumed_from else 0)
        plan = micro_batch_plan(self.data.sampler(cfg.seed), cfg.seed, start, seen, cfg.steps, cfg.global_batch,
                                cfg.micro_batch, env.world, env.rank)
        batches = self.data.loader(plan, cfg.seed)
        bar = progress(total=cfg.steps, initial=start, disable=env.rank != 0, desc=cfg.recipe)
        step, top1, saved_at, stopped = start, None, start if resumed_from else None, False
        speed, t_run = None, time.perf_counter() - log.elapsed  # training time goes on from a resumed step
        self.core.train()
        # the bar is closed on an error too: its message starts a line of its own
        with _StopRequest(announce=env.rank == 0) as stop, bar:
            while step < cfg.steps:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                rng = self._rng_state()  # cheap: a few KB
                try:
                    loss, norm, stopped = self._step(batches, stop, step, seen)
                except BadSampleLimit as e:  # every rank, together: keep the finished steps
                    self._set_rng_state(rng)  # as before the step, which a resume then repeats
                    if step > 0 and (saved_at == step or self.save(step, seen)):
                        e.args = (f"{e}. Saved checkpoint at step {step}, before this step: the same command with a "
                                  f"larger --max-bad-frac goes on from there",)
                    raise
                step, seen = step + 1, seen + cfg.global_batch
                dt = time.perf_counter() - t0
                speed = cfg.global_batch / dt if speed is None else 0.9 * speed + 0.1 * cfg.global_batch / dt
                row = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "img_per_s": cfg.global_batch / dt,
                       "epoch": seen / self.data.num_train, "bad_samples": self.bad_total,
                       "time": time.perf_counter() - t_run}
                if self.peak:
                    row["mfu"] = row["img_per_s"] * self.train_flops / (self.peak * env.world)
                log.write(row)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    top1 = self.evaluate()
                    log.write({"step": step, "eval_top1": top1})
                    if env.rank == 0:
                        bar.write(f"step {step}: held-out top-1 {top1_text(top1)}")
                final = stopped or step == cfg.steps
                if (final or step % cfg.save_every == 0) and self.save(step, seen, final=final):
                    saved_at = step
                if on_step_end is not None:
                    on_step_end(step, row)
                if stopped:
                    if env.rank == 0:
                        # the default --out holds the start time: a rerun without --out would start a new run
                        hint = (f"the same command with --out {cfg.out} resumes it" if self.resume_hint is None
                                else self.resume_hint)
                        bar.write(f"{stop.requested or 'a stop request'}: saved checkpoint at step {step}; exiting"
                                  + (f" ({hint})" if hint else ""))
                    break
        if saved_at != step:
            self.save(step, seen, final=True)
        if stopped:  # not finished: no final accuracy (the last evaluation is in metrics.jsonl), no model folder
            if env.rank == 0:
                plot_curves(log.path, self.out / "curves.png")
            return {"step": step, "top1": None, "out": str(self.out), "stopped_by_signal": True,
                    "signal": stop.requested or "SIGTERM", "train_time_s": time.perf_counter() - t_run}
        if step == start:  # resumed at the end: report the final accuracy again
            more = " (a larger --steps would go on training it)" if self.resume_hint != "" else ""  # "": a tool's run
            rank0_print(env, f"the run in {self.out} is complete (step {step} of {cfg.steps}): evaluating its model "
                             f"again{more}")
            top1 = self.evaluate()
        result = {"step": step, "top1": top1, "out": str(self.out), "stopped_by_signal": False,
                  "train_time_s": time.perf_counter() - t_run}
        final = self._plain_model()  # FSDP2: gathered on every rank, once for both uses
        result["model_dir"] = self._save_model_folder(final)
        if cfg.fewshot:
            result["fewshot"] = self._fewshot(final)
        if env.rank == 0:
            log.write({"step": step, "final_top1": top1, "train_time_s": result["train_time_s"],
                       **({"fewshot": result["fewshot"]} if "fewshot" in result else {})})
            plot_curves(log.path, self.out / "curves.png")
            print(f"held-out top-1 {top1_text(top1)} at step {step}; {result['train_time_s']:.1f} s; metrics "
                  f"{log.path}, curves {self.out / 'curves.png'}, model {result['model_dir']}", flush=True)
        return result

    def _save_model_folder(self, model) -> str:
        """The final weights as a timm Hub folder (``out/model``: config.json + model.safetensors), which
        ``timm.create_model('local-dir:...', pretrained=True)`` and fastvit load (and ``hf-hub:`` after an upload)."""
        folder = self.out / "model"
        problem = None
        if self.env.rank == 0:  # the preprocessing this run evaluated with, not that of the architecture's weights
            try:
                fastvit.save_pretrained(model, folder, model_config={"pretrained_cfg": {**self.data.preprocessing,
                                                                                          "tag": None}})
            except Exception as e:  # noqa: BLE001  a full disk raises OSError, or safetensors' own error
                for part in folder.glob("*.tmp"):
                    part.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty: a folder of an earlier, complete write stays
                problem = (f"the final weights could not be written to {folder} ({checkpoint.failure_reason(e)}"
                           f"{checkpoint.free_space_note(self.out)}); the run's last checkpoint holds them: rerun "
                           f"the same command to write {folder} from it")
        problem = from_rank0(problem)  # every rank stops with the same error
        if problem:
            raise checkpoint.CheckpointWriteError(problem)
        return str(folder)

    def _fewshot(self, model):
        from fastvit import fewshot
        results = None
        if self.env.rank == 0:
            try:
                results = fewshot.evaluate(model, self.data.train_eval, self.data.test,
                                           workers=self.data.eval_workers(self.cfg.workers))
                print(f"few-shot: {fewshot.format_results(results)}", flush=True)
            except DataError as e:  # the run is done and saved: say so, and let the other ranks go on
                print(f"few-shot: not measured ({e})", flush=True)
        return from_rank0(results)


def train(cfg: TrainConfig, on_step_end=None, resume_hint: str | None = None) -> dict:
    """Run one training run (inside torchrun, or on one process) and return its final metrics (``resume_hint``:
    :class:`Run`'s)."""
    with keep_thread_count(), distributed(cfg.dist_backend, cfg.device, cfg.dist_timeout) as env:
        return Run(cfg, env, resume_hint).fit(on_step_end)


def main(argv=None) -> list:
    short_warnings()
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    try:
        device_and_backend(cfg.device, cfg.dist_backend)
    except ValueError as e:
        setting_error(parser, e)
    results = []
    try:
        with keep_thread_count(), distributed(cfg.dist_backend, cfg.device, cfg.dist_timeout) as env:
            try:
                check(resolve(cfg, env.world)[0], env.world)  # before the loop over --seeds
            except ValueError as e:
                setting_error(parser, e)
            cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
            for i in range(cfg.seeds):
                run_cfg, hint = cfg, None
                if cfg.seeds > 1:  # one run folder per seed, resumed by the command that names their parent
                    run_cfg = dataclasses.replace(cfg, seed=cfg.seed + i, out=f"{cfg.out}/seed_{cfg.seed + i}")
                    hint = (f"the same command with --out {cfg.out} resumes its seeds, a finished one only "
                            f"evaluated again")
                try:
                    run = Run(run_cfg, env, hint)
                except ValueError as e:
                    setting_error(parser, e)
                results.append(run.fit())
                if results[-1]["stopped_by_signal"]:  # the other seeds are not started
                    break
            # a stopped run, or one without a readable held-out image, has no top-1 to summarise
            if cfg.seeds > 1 and all(r["top1"] is not None for r in results):
                top1 = np.array([r["top1"] for r in results]) * 100
                summary = Path(cfg.out) / "seeds.json"
                if env.rank == 0:
                    summary.write_text(json.dumps({"seeds": [cfg.seed + i for i in range(cfg.seeds)],
                                                   "top1": top1.tolist(), "mean": top1.mean(),
                                                   "std": top1.std(ddof=1)}, indent=1) + "\n")
                rank0_print(env, f"held-out top-1 over {cfg.seeds} seeds: {top1.mean():.2f} ± "
                                  f"{top1.std(ddof=1):.2f}% ({', '.join(f'{t:.2f}' for t in top1)}; {summary})")
    except (FloatingPointError, DataError, checkpoint.CheckpointWriteError) as e:
        report_error(e)
        sys.exit(1)
    except RuntimeError as e:
        lost = lost_a_rank(e)
        if lost is None:
            raise
        # a survivor's traceback of the collective it waited in (~30 lines) reads like the failure itself
        print(f"error: rank {os.environ.get('RANK', '?')} lost another rank of the job ({lost}); its log says why. "
              f"Under torchrun --max-restarts the job restarts and resumes from the newest complete checkpoint",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if results and results[-1]["stopped_by_signal"]:
        sys.exit(stop_status(results[-1]))
    return results


def setting_error(parser, error: Exception):
    """Exit as ``parser.error`` does (status 2, the program's name before the message) but without the usage,
    which runs to 30 lines here: these errors come from the data, the run folder or a combination of flags, and
    name what to change."""
    parser.exit(2, f"{parser.prog}: error: {error}\n")


def top1_text(top1: float | None) -> str:
    """A held-out top-1 as printed: a percentage, or why there is none."""
    if top1 is None:
        return "not measured (no held-out image could be read; each is named in a warning above)"
    return f"{100 * top1:.2f}%"


# errors every rank raises at once, with the same message (from all-reduced losses and counts, or an agreed write)
_COLLECTIVE_ERRORS = (FloatingPointError, BadSampleLimit, checkpoint.CheckpointWriteError)


def report_error(error: Exception) -> None:
    """Print ``error`` as the run's last line, once per job where every rank raised it at once (rank 0 says it;
    each rank said it under torchrun), else on the rank that raised it."""
    if isinstance(error, _COLLECTIVE_ERRORS) and os.environ.get("RANK", "0") != "0":
        return
    print(f"error: {own_message(error)}", file=sys.stderr, flush=True)


def own_message(error: Exception) -> str:
    """The error's own message: raised in a loader worker, it comes back with the worker's traceback in front
    (torch's ExceptionWrapper), whose last line is the original error."""
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


def stop_status(result) -> int:
    """The exit status of a run a stop request ended: 128 + the signal's number (130 after Ctrl-C, 143 after
    SIGTERM, also on the ranks that stopped with the one that got it), as a shell reports a process that signal
    killed, so that ``train && fewshot`` stops there and a scheduler or torchrun sees an unfinished job."""
    return 128 + signal.Signals[result["signal"]].value


if __name__ == "__main__":
    main(sys.argv[1:])
