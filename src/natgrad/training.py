"""Train a built-in task (:mod:`natgrad.tasks`) with one optimizer: metrics, checkpoints, resume.

``train(task, optimizer, ...)`` returns a summary dict and, with ``out``, writes

* ``out/metrics.jsonl`` — one line per step: ``step``, ``epoch`` (epochs completed, fractional),
  ``time_s`` (training wall-clock: the steps only, excluding evaluation and file writing),
  ``train_loss`` (the loss of that step's batch); on evaluation steps (every ``eval_every``
  steps, step 0 and the last step) also ``full_train_loss`` (mean loss over the whole training
  split), ``test_loss``, ``test_accuracy`` (``null`` for the autoencoder, which reports
  ``test_reconstruction_error`` instead). Step 0 is the evaluation before training. With
  ``eval_seconds`` a step is also an evaluation step once that much training time has passed
  since the last evaluation: the same time resolution for fast and slow optimizers.
* ``out/checkpoint.pt`` — model, optimizer, torch RNG state (every rank's when distributed),
  data-order RNG and position, step, training time; written atomically (temporary file +
  ``os.replace``) every ``checkpoint_every`` steps and at the end. ``resume=True`` continues
  from it bit-for-bit.
* ``out/summary.json`` — the returned summary.

The file names, atomic writes and reading a checkpoint's configuration live in
:mod:`natgrad.training_files`.

Distributed (torch.distributed initialised with several processes, e.g. under ``torchrun`` or
``natgrad train --nproc N``): DistributedDataParallel, ``batch_size`` the global batch split
over the ranks, rank 0 writing every file; see :mod:`natgrad.training_dist` and
docs/distributed.md.

The target loss is reached at the first evaluation whose full training loss is ≤ the task's
target, so ``steps_to_target`` has the resolution of ``eval_every`` (and ``time_to_target_s``
that of ``eval_seconds``, if given).

Optimizers come from the registry :mod:`natgrad.registry` (re-exported here). Curvature
optimizers with adaptive damping get a closure (the batch's loss after the step) on the steps
where they adapt it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .atomic import atomic_path, write_bytes_atomic
from .progress import progress_bar
from .registry import OPTIMIZERS, OptimizerSpec, get_optimizer, register_optimizer
from .tasks import Data, Task, get_task
from .training_dist import current
from .training_files import (CHECKPOINT, CHECKPOINT_VERSION, METRICS, SUMMARY, _finite,
                             checkpoint_config, prepare_out, write_json)

__all__ = ["train", "run", "Run", "OptimizerSpec", "OPTIMIZERS", "register_optimizer", "get_optimizer",
           "evaluate", "write_json", "checkpoint_config"]


# --------------------------------------------------------------------------- helpers

def _positive(name: str, value, integer: bool = False, zero: bool = False):
    """``value`` (None passes), checked to be a finite number > 0 (>= 0 with ``zero``)."""
    if value is None:
        return None
    kind = (int,) if integer else (int, float)
    if (isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value)
            or value < 0 or (value == 0 and not zero)):
        kind_name = "integer" if integer else "number"
        what = f"a {kind_name} >= 0" if zero else f"a positive {kind_name}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, data: Data, chunk: int = 1000) -> dict:
    """Full training loss, test loss and the task's metric, without gradients (the optimizers'
    hooks only record when grad is enabled) and in eval mode (batch norm uses and keeps its
    running statistics), the model's mode restored afterwards."""
    sums = {"full_train_loss": 0.0, "test_loss": 0.0}
    was_training = model.training
    model.eval()
    try:
        for key, x, y in (("full_train_loss", data.x_train, data.y_train), ("test_loss", data.x_test, data.y_test)):
            for i in range(0, x.shape[0], chunk):
                out = model(x[i:i + chunk])
                sums[key] += float(task.loss(out, y[i:i + chunk])) * out.shape[0] / x.shape[0]
                for name, value in (task.metric_sums(out, y[i:i + chunk]).items() if key == "test_loss" else ()):
                    sums["test_" + name] = sums.get("test_" + name, 0.0) + value / x.shape[0]
    finally:
        model.train(was_training)
    sums.setdefault("test_accuracy", None)
    return sums


# --------------------------------------------------------------------------- the run

@dataclass
class Run:
    """Result of :func:`run`: the summary and every metrics record (as written to JSONL)."""

    summary: dict
    records: list[dict] = field(default_factory=list)


def train(task, optimizer: str, steps=None, epochs=None, batch_size=None, lr=None, damping=None, seed=None,
          out=None, resume=False, time_budget=None, progress=True, eval_every=None, eval_seconds=None,
          **options) -> dict:
    """Train ``task`` with ``optimizer``; returns the summary (see the module docstring).

    Stops at the first of ``steps``, ``epochs`` and ``time_budget`` (seconds of training time);
    with none of them, after the task's default number of epochs. ``lr``/``damping``/
    ``batch_size`` default to the optimizer's and task's defaults; ``seed`` (model initialisation,
    Monte-Carlo samples and data order) defaults to 0. With ``resume=True`` the run in ``out``
    continues with its own lr/damping/batch size/seed (passing a different one is an error);
    ``steps``/``epochs``/``time_budget`` count from the start of the run. Extra options:
    ``checkpoint_every`` (steps, default 100), ``mnist_dir``, ``data`` (preloaded :class:`Data`).
    ``progress``: True/"bar" a tqdm bar (epoch, loss, accuracy, time), "lines" the same as a
    plain line every 10 s (logs, pipes), False nothing.
    """
    return run(task, optimizer, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, damping=damping,
               seed=seed, out=out, resume=resume, time_budget=time_budget, progress=progress,
               eval_every=eval_every, eval_seconds=eval_seconds, **options).summary


def run(task, optimizer: str, steps=None, epochs=None, batch_size=None, lr=None, damping=None, seed=None,
        out=None, resume=False, time_budget=None, progress=True, eval_every=None, eval_seconds=None,
        checkpoint_every=100, mnist_dir=None, data: Data | None = None) -> Run:
    """:func:`train`, also returning every metrics record."""
    task = get_task(task)
    spec = get_optimizer(optimizer)
    for name, value, integer in (("steps", steps, True), ("epochs", epochs, True), ("batch_size", batch_size, True),
                                 ("lr", lr, False), ("time_budget", time_budget, False),
                                 ("eval_every", eval_every, True), ("eval_seconds", eval_seconds, False),
                                 ("checkpoint_every", checkpoint_every, True)):
        _positive(name, value, integer)
    _positive("damping", damping, zero=True)
    if damping is not None and not spec.curvature:
        raise ValueError(f"damping is only used by the curvature optimizers, not {optimizer!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if resume and out is None:
        raise ValueError("resume needs the output directory of the run to continue (out=...)")
    out = None if out is None else Path(out).expanduser()
    checkpoint = None
    if resume:
        path = out / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"no checkpoint to resume from in {str(out)!r} ({CHECKPOINT} is missing)")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        config = checkpoint["config"]
        given = {"task": task.name, "optimizer": optimizer, "lr": lr, "damping": damping, "batch_size": batch_size,
                 "seed": seed}
        for key, value in given.items():
            if value is not None and value != config[key]:
                raise ValueError(f"--resume continues the run in {str(out)!r}, which has {key}={config[key]!r}, "
                                 f"not {value!r}; drop the option or use another output directory")
        lr, damping, batch_size, seed = config["lr"], config["damping"], config["batch_size"], config["seed"]
        eval_every = eval_every or config["eval_every"]
        eval_seconds = eval_seconds or config.get("eval_seconds")
    batch_size = batch_size or task.batch_size
    seed = 0 if seed is None else seed
    eval_every = eval_every or task.eval_every
    if data is None:
        data = task.load(mnist_dir)
    config = {"task": task.name, "optimizer": optimizer, "lr": lr, "damping": damping, "batch_size": batch_size,
              "seed": seed, "eval_every": eval_every, "eval_seconds": eval_seconds}
    return _Trainer(task, spec, data, config, out, checkpoint, checkpoint_every, progress).loop(steps, epochs, time_budget)


class _Trainer:
    def __init__(self, task, spec, data, config, out, checkpoint, checkpoint_every, progress):
        self.ranks = current()  # SINGLE (one process) or the ranks of torch.distributed's default group
        self.task, self.spec, self.data, self.config, self.out = task, spec, data, config, out
        self.checkpoint_every, self.progress = checkpoint_every, progress if self.ranks.leader else False
        self.n = data.x_train.shape[0]
        self.batch_size = min(config["batch_size"], self.n)
        self.ranks.check_batch(self.batch_size, self.n)
        self.steps_per_epoch = math.ceil(self.n / self.batch_size)
        torch.manual_seed(config["seed"])
        self.model = task.make_model()
        self.ranks.check_same(config, self.model)
        self.opt = spec.make(self.model, task, config["lr"], config["damping"], self.ranks.shard(data.x_train))
        group = self.opt.param_groups[0]
        config["lr"], config["damping"] = float(group["lr"]), (float(group["damping"]) if spec.curvature else None)
        if out is not None:  # only now: bad input must leave nothing behind
            self.ranks.leader_does(prepare_out, out)
        self.ranks.seed(config["seed"])
        self.generator = torch.Generator().manual_seed(config["seed"])
        self.perm, self.pos, self.step, self.elapsed = None, 0, 0, 0.0
        self.reached: dict = {"steps_to_target": None, "time_to_target_s": None}
        self.last_eval: dict = {}
        self.records: list[dict] = []
        if checkpoint is not None:
            self._load(checkpoint)
        elif out is not None and self.ranks.leader:
            for name in (CHECKPOINT, SUMMARY, METRICS):
                (out / name).unlink(missing_ok=True)
        self.net = self.ranks.wrap(self.model)  # DistributedDataParallel, or the model itself

    # ------------------------------------------------------------ state
    def _load(self, ck: dict) -> None:
        if ck.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint in {str(self.out)!r} has an unknown format version {ck.get('version')!r}")
        self.ranks.restore_rng(ck, self.out)  # this rank's; ValueError if the number of processes differs
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.generator.set_state(ck["data_rng"])
        self.perm, self.pos, self.step, self.elapsed = ck["perm"], ck["pos"], ck["step"], ck["elapsed"]
        self.reached, self.last_eval = dict(ck["reached"]), dict(ck["last_eval"])
        path = self.out / METRICS
        if path.is_file() and self.ranks.leader:  # drop lines written after the checkpoint
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line)["step"] <= self.step]
            self.records = [json.loads(line) for line in kept]
            write_bytes_atomic(path, "".join(line + "\n" for line in kept).encode())

    def _save(self) -> None:
        rngs = self.ranks.rng_states()  # torch_rng, world_size (and every rank's: rank_rngs), on rank 0
        optimizer = self.opt.state_dict()  # on every rank: a sharded optimizer gathers its state
        if not self.ranks.leader:
            return
        state = {
            "version": CHECKPOINT_VERSION, "config": self.config, "model": self.model.state_dict(),
            "optimizer": optimizer, **rngs, "data_rng": self.generator.get_state(), "perm": self.perm,
            "pos": self.pos, "step": self.step, "elapsed": self.elapsed, "reached": self.reached,
            "last_eval": self.last_eval,
        }
        with atomic_path(self.out / CHECKPOINT) as tmp:
            try:
                torch.save(state, tmp)
            except RuntimeError as exc:  # torch's writer reports a full disk as RuntimeError
                raise OSError(f"could not write the checkpoint in {str(self.out)!r}: {exc}") from exc

    # ------------------------------------------------------------ loop
    def _evaluate(self, record: dict) -> None:
        if not self.ranks.leader:  # evaluation runs on rank 0 only
            return
        result = evaluate(self.task, self.model, self.data)
        record.update(result)
        self.last_eval = dict(result, step=self.step, time_s=self.elapsed)
        loss = result["full_train_loss"]
        if self.reached["steps_to_target"] is None and math.isfinite(loss) and loss <= self.task.target_loss:
            self.reached = {"steps_to_target": self.step, "time_to_target_s": self.elapsed}

    def _evaluation_due(self) -> bool:
        every, seconds = self.config["eval_every"], self.config.get("eval_seconds")
        since = self.elapsed - self.last_eval.get("time_s", 0.0)
        return self.step % every == 0 or (seconds is not None and since >= seconds)

    def _write(self, record: dict) -> None:
        if not self.ranks.leader:
            return
        self.records.append(record)
        if self.out is not None:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps({k: _finite(v) if isinstance(v, float) else v for k, v in record.items()}) + "\n")

    def _batch(self):
        if self.perm is None:
            self.perm = torch.randperm(self.n, generator=self.generator)
        idx = self.perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        if self.pos == self.steps_per_epoch:
            self.perm, self.pos = None, 0
        return self.data.x_train[idx], self.data.y_train[idx]

    def _one_step(self) -> float:
        x, y = self.ranks.local(*self._batch())  # this rank's slice of the global batch
        self.ranks.test_hook(self.step + 1)
        self.opt.zero_grad(set_to_none=True)
        output = self.net(x)
        loss = self.task.loss(output, y)
        value = self.ranks.mean_loss(float(loss.detach()))  # the global batch's, on every rank
        if not math.isfinite(value):
            return value
        if self.spec.curvature:
            self.opt.backward(loss, output)
        else:
            loss.backward()
        closure = self._closure(x, y)
        if closure is None:
            self.opt.step()
        else:
            self.opt.step(closure)
        return value

    def _closure(self, x: Tensor, y: Tensor) -> Callable[[], Tensor] | None:
        """The batch's loss after the step, for adaptive damping, on the steps that adapt only
        (one extra forward pass there, no backward; nothing is recorded without grad)."""
        policy = getattr(self.opt, "damping_policy", None)
        if policy is None or not policy.adaptive or self.opt.steps % policy.adapt_every != 0:
            return None

        def closure() -> Tensor:
            with torch.no_grad():
                return self.task.loss(self.model(x), y)

        return closure

    def loop(self, steps, epochs, time_budget) -> Run:
        limits = [s for s in (steps, None if epochs is None else epochs * self.steps_per_epoch) if s is not None]
        if not limits and time_budget is None:
            limits = [self.task.default_epochs * self.steps_per_epoch]
        limit = min(limits) if limits else None
        bar = self._bar(limit)
        if self.step == 0 and not self.records:
            record = {"step": 0, "epoch": 0.0, "time_s": 0.0, "train_loss": None}
            self._evaluate(record)
            self._write(record)
        stopped, diverged = "steps", False
        try:
            while True:
                if limit is not None and self.step >= limit:
                    stopped = "steps" if steps is not None and self.step >= steps else "epochs"
                    break
                if time_budget is not None and self.elapsed >= time_budget:
                    stopped = "time_budget"
                    break
                start = time.perf_counter()
                value = self._one_step()
                self.elapsed += time.perf_counter() - start
                if time_budget is not None:  # every rank stops at the same step: rank 0's clock
                    self.elapsed = self.ranks.leader_value(self.elapsed)
                self.step += 1
                diverged = not math.isfinite(value)
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 6),
                          "time_s": self.elapsed, "train_loss": value}
                last = diverged or (limit is not None and self.step >= limit) or \
                    (time_budget is not None and self.elapsed >= time_budget)
                if last or self._evaluation_due():
                    self._evaluate(record)
                self._write(record)
                if self.out is not None and not diverged and self.step % self.checkpoint_every == 0:
                    self._save()
                self._update_bar(bar, value)
                if diverged:
                    stopped = "diverged"
                    break
        finally:
            if bar is not None:
                bar.close()
        if self.last_eval.get("step") != self.step:  # e.g. resumed with nothing left to do
            self._evaluate({})
        if self.out is not None and not diverged:
            self._save()
        summary = self.ranks.share(self._summary(stopped, diverged))  # rank 0's, with its evaluation
        if self.out is not None and self.ranks.leader:
            write_json(self.out / SUMMARY, summary)
        return Run(summary, self.records)

    def _bar(self, limit):
        return progress_bar(self.progress, limit, f"{self.config['task']} {self.config['optimizer']}", "step",
                            initial=self.step)

    def _update_bar(self, bar, value) -> None:
        if bar is None:
            return
        bar.update(1)
        if self.step % 10 == 0 or self.last_eval.get("step") == self.step:
            post = {"epoch": f"{self.step / self.steps_per_epoch:.2f}", "loss": f"{value:.4g}"}
            acc = self.last_eval.get("test_accuracy")
            if acc is not None:
                post["acc"] = f"{acc:.3f}"
            post["time"] = f"{self.elapsed:.1f}s"
            bar.set_postfix(post, refresh=False)

    def _summary(self, stopped: str, diverged: bool) -> dict:
        ev = self.last_eval
        summary = {
            **self.config, "target_loss": self.task.target_loss, "steps": self.step,
            "epochs": self.step / self.steps_per_epoch, "time_s": self.elapsed, "stopped_by": stopped,
            "diverged": diverged, "final_train_loss": ev.get("full_train_loss"), "final_test_loss": ev.get("test_loss"),
            "final_test_accuracy": ev.get("test_accuracy"), **self.reached,
        }
        if "test_reconstruction_error" in ev:
            summary["final_test_reconstruction_error"] = ev["test_reconstruction_error"]
        return summary
