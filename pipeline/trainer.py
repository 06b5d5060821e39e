"""The trainer: named ``build_*`` steps, the training step, periodic evaluation and the end of a run.

No argument parsing here (see :mod:`pipeline.train`), no rank checks outside the set-up: the
metric logger is a no-op on ranks other than 0 and checkpoints are written by the main rank.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3

from data_prep.format import atomic_write_bytes
from model.factory import count_params
from model.flops import count_flops
from model.registry import is_model
from model.viz import render_pictures, why_no_pictures
from pipeline import checkpoint as ckpt
from pipeline.build import build_model, num_classes_of
from pipeline.config import ConfigError, JobCfg
from pipeline.config_io import dump_toml, flatten
from pipeline.data.integrity import check_data_kind
from pipeline.data.loaders import build_loaders, input_shape
from pipeline.dist import broadcast_object
from pipeline.engine import Engine, weights_only_loads, weights_sharded
from pipeline.evaluate import evaluate
from pipeline.export import code_version, export_info, register_export, write_export
from pipeline.log import setup_logging
from pipeline.metrics import ConsoleLogger, LoggerContainer, MlflowLogger, NullLogger, default_tracking_uri
from pipeline.objective import build_objective
from pipeline.optim import build_optimizer, build_scheduler, peak_lr
from pipeline.preempt import EXIT_PREEMPTED, Preempted, Preemption
from pipeline.rundir import (
    RunError,
    check_run_dir,
    free_space,
    lock_run_dir,
    reserve_space,
    run_dir_of,
    storage_message,
)
from pipeline.state_files import StateObjects

logger = logging.getLogger(__name__)


def check_startup(cfg: JobCfg) -> None:
    """Fails before anything is created, naming the key, for an unknown model or missing data."""
    if not is_model(cfg.model.name):
        raise ConfigError(f"model.name = {cfg.model.name!r}: not a registered model (see `vitpipe models`)")
    if cfg.optim.ema_decay and weights_sharded(cfg.engine):
        raise ConfigError(f"optim.ema_decay = {cfg.optim.ema_decay}: EMA needs whole weights on every rank; "
                          f"not with engine.zero_stage = {cfg.engine.zero_stage}")
    if cfg.model.init_from and not Path(cfg.model.init_from).is_file():
        raise ConfigError(f"model.init_from = {cfg.model.init_from!r}: no such weights file")
    if not cfg.data.path:
        raise ConfigError("data.path = '': must name a dataset directory written by `vitpipe prep`")
    if not (Path(cfg.data.path) / "dataset.json").is_file():
        raise ConfigError(f"data.path = {cfg.data.path!r}: no dataset.json there; "
                          "prepare the data with `vitpipe prep imagenet --src ... --out ...`")
    check_data_kind(cfg.data.path, cfg.data.train_split, cfg.model.name)  # image vs video, in seconds


def _set_cpu_threads(requested: int, loader_workers: int, acc: Any) -> None:
    """Sets the training process's intra-op threads on CPU (``engine.cpu_threads``; 0 = what is left)."""
    if not requested and "OMP_NUM_THREADS" in os.environ:
        return  # the launcher (torchrun sets 1 per process) or the user decided
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    threads = requested or max(1, (os.cpu_count() or 1) // local - loader_workers)
    torch.set_num_threads(threads)
    logger.info("CPU training: %d intra-op thread(s) per process", threads)


def resolve_run_dir(cfg: JobCfg, recipe_stem: str, is_main: bool) -> Path:
    """Picks the run directory on rank 0 (``<output_dir>/<name>``) and shares it with all ranks.

    A directory with an unfinished run is taken over (and resumed from its latest checkpoint when
    ``checkpoint.resume`` is on); one whose run finished is refused. Rank 0 holds the directory's lock
    for the rest of its life (:func:`pipeline.rundir.lock_run_dir`): one job per run directory.

    Raises:
        ConfigError: On every rank, when the directory cannot be used (or another job holds it).
    """
    run_dir, error = run_dir_of(cfg, recipe_stem), None
    if is_main:
        try:
            lock_run_dir(run_dir)
            check_run_dir(run_dir, cfg.checkpoint.resume)
            reserve_space(run_dir)
        except (ConfigError, RunError, OSError) as err:
            error = str(err)
    run_dir_text, error = broadcast_object((str(run_dir), error))
    if error:  # raised on every rank, so that none waits for the others
        raise ConfigError(error)
    return Path(run_dir_text)


class Trainer:
    """Trains one job; construct under the launcher, then call :meth:`fit`.

    Args:
        cfg: The resolved config.
        recipe_stem: Recipe file name without suffix (names the run when ``run.name`` is empty).
    """

    def __init__(self, cfg: JobCfg, recipe_stem: str = "run") -> None:
        check_startup(cfg)
        self.cfg = cfg
        self.engine = Engine(cfg.engine, cfg.data.batch_size, cfg.optim.clip_grad)
        self.acc = self.engine.acc
        self.input_dtype = self.engine.input_dtype
        self.objective = build_objective(cfg.loss)
        self.memory_format = torch.channels_last if cfg.engine.channels_last else torch.contiguous_format
        self.rank, self.world_size = self.acc.process_index, self.acc.num_processes
        self.device = self.acc.device
        if self.device.type == "cpu":
            _set_cpu_threads(cfg.engine.cpu_threads, cfg.data.num_workers, self.acc)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.mlflow_run_id: str | None = None
        self.recipe_stem, self.pictures_noted = recipe_stem, False
        self.run_dir = resolve_run_dir(cfg, recipe_stem, self.acc.is_main_process)
        self.build_run_dir()
        self.build_data()
        self.build_model()
        self.checkpoint: tuple[Path, dict[str, Any]] | None = None
        try:
            self.checkpoint = self.find_checkpoint() if cfg.checkpoint.resume else None
            self.build_optimizer()
            if self.checkpoint is not None:
                self.resume(*self.checkpoint)
        except Exception as err:
            self.record_failed_resume(err)
            raise
        self.build_tracking()
        self.preemption = Preemption(cfg.checkpoint.preempt_timeout_s)
        self.preemption.at_exit(self.metrics.save_pending)  # a forced exit keeps the queued metrics

    # ----------------------------------------------------------------- set-up
    def build_run_dir(self) -> None:
        """Creates the run directory, the per-rank logs and the resolved ``config.toml``."""
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.toml", dump_toml(self.cfg).encode())
            self.engine.write_files(self.run_dir)
        self.acc.wait_for_everyone()
        setup_logging(self.rank, self.run_dir, self.cfg.run.log_level)
        logger.info("run directory %s", self.run_dir)

    def build_data(self) -> None:
        """Builds this rank's training and evaluation loaders."""
        self.num_classes = num_classes_of(self.cfg)
        self.train_loader, self.eval_loader = build_loaders(
            self.cfg, rank=self.rank, world_size=self.world_size, device=self.device, num_classes=self.num_classes)

    def build_model(self) -> None:
        """Builds the model (same init on every rank), then wraps it through the engine."""
        _seed_everything(self.cfg.run.seed)
        net = build_model(self.cfg, self.num_classes)
        self.num_params = count_params(net)
        self.flops_per_sample = count_flops(net, torch.zeros(1, *input_shape(self.cfg.data)))  # forward
        logger.info("model %s: %.3f M parameters, %.3f GFLOPs per sample", self.cfg.model.name,
                    self.num_params / 1e6, self.flops_per_sample / 1e9)
        if self.cfg.engine.grad_checkpointing:
            net.set_grad_checkpointing(True)
        if self.cfg.engine.channels_last:
            net = net.to(memory_format=torch.channels_last)
        decay = self.cfg.optim.ema_decay
        self.ema = ModelEmaV3(net, decay=decay, device=self.device) if decay else None
        _seed_everything(self.cfg.run.seed + 1000 * self.rank)  # different augmentation per rank
        self.net = net

    def build_optimizer(self) -> None:
        """Builds optimizer and per-step scheduler, then prepares model and optimizer with the engine."""
        self.global_batch = self.cfg.data.batch_size * self.world_size * self.cfg.engine.grad_accum_steps
        self.peak_lr = peak_lr(self.cfg.optim, self.global_batch)
        opt = build_optimizer(self.net, self.cfg.optim, self.peak_lr)
        self.model, self.optimizer = self.engine.prepare(self.net, opt)
        accum = self.cfg.engine.grad_accum_steps
        self.steps_per_epoch = len(self.train_loader) // accum
        self.train_loader.steps_per_epoch = self.steps_per_epoch * accum  # no step straddles two epochs
        self.total_steps = self.cfg.schedule.epochs * self.steps_per_epoch
        if self.cfg.schedule.max_steps:
            self.total_steps = min(self.total_steps, self.cfg.schedule.max_steps)
        # Not prepared by accelerate: it is stepped once per optimizer step, on every rank, and saved
        # with the checkpoints in vitpipe's own files, as the EMA is (pipeline.state_files: no pickles).
        self.scheduler = build_scheduler(self.optimizer, self.cfg.schedule, self.steps_per_epoch, self.peak_lr)
        self.state_objects = StateObjects(self.scheduler, self.ema)

    def build_tracking(self) -> None:
        """Rank 0 creates (or, on resume, reopens) the job's one MLflow run and shares its id."""
        self.metrics: Any = NullLogger()
        run_id = None
        if self.acc.is_main_process:
            loggers: list[Any] = [ConsoleLogger()]
            if self.cfg.tracking.enabled:
                loggers += self._mlflow_logger()
            self.metrics = LoggerContainer(loggers)
            run_id = self.metrics.run_id
        self.mlflow_run_id = broadcast_object(run_id)

    def _mlflow_logger(self) -> list[Any]:
        t = self.cfg.tracking
        uri = t.uri or default_tracking_uri(self.cfg.run.output_dir)
        tags = {"vitpipe.run_dir": str(self.run_dir), "vitpipe.world_size": str(self.world_size),
                "vitpipe.model": self.cfg.model.name, "vitpipe.engine": self.cfg.engine.backend,
                "vitpipe.git_sha": code_version(), "vitpipe.slurm_job_id": os.environ.get("SLURM_JOB_ID", "")}
        try:
            return [MlflowLogger(uri, t.experiment, self.run_dir.name, flatten(self.cfg), tags,
                                 run_id=self.mlflow_run_id, system_metrics_s=t.system_metrics_s,
                                 pending_file=self.run_dir / "mlflow_pending.json")]
        except Exception as err:  # noqa: BLE001 - an unreachable tracking store never stops training
            logger.warning("MLflow at %s unreachable at start (%s): training without tracking", uri, err)
            return []

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Trains for the configured length, evaluating and checkpointing on schedule.

        Returns:
            The run summary (also written to ``<run dir>/summary.json``).
        """
        start, status, result = time.perf_counter(), "FAILED", {}
        try:
            while self.step < self.total_steps:
                self.train_one_epoch()
                if self.batch_in_epoch < len(self.train_loader):
                    break  # stopped inside the epoch (max_steps): the checkpoint keeps the position
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                every = self.cfg.eval.every_epochs
                if every and self.epoch % every == 0 and self.step < self.total_steps:
                    self.run_eval()
            result = self.run_eval()
            self.save_final()
            status = "FINISHED"
        except Preempted:
            status = "PREEMPTED"
        except (OSError, RuntimeError) as err:  # a full disk: give back the reserve, drop partial checkpoints
            if self.acc.is_main_process and storage_message(err, self.run_dir) is not None:  # torch: RuntimeError
                free_space(self.run_dir)
            raise
        finally:
            self.preemption.restore()
            summary = self.summary(result, time.perf_counter() - start, status)
            left = self.preemption.time_left()  # after a signal: deliver metrics before the watchdog fires
            self.metrics.close({"PREEMPTED": "KILLED"}.get(status, status), None if left is None else left * 0.8)
        if status == "FINISHED":
            self.register_final()
        return summary

    def train_one_epoch(self) -> None:
        """Runs one epoch (or up to ``total_steps``), logging every ``tracking.log_every_steps`` steps.

        The loss stays on the device between log steps: a step reads nothing back to the host, so the
        host can queue the next step's work while the device runs this one.
        """
        self.model.train()
        self.train_loader.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        meter = _Meter()
        t_wait = time.perf_counter()
        for batch in self.train_loader:
            meter.wait += time.perf_counter() - t_wait
            loss = self.train_micro_step(batch)
            meter.add(loss, batch["label"].numel())
            self.batch_in_epoch += 1
            if self.batch_in_epoch % self.cfg.engine.grad_accum_steps == 0:
                self.step += 1
                self.after_step(meter)
                if self.step >= self.total_steps:
                    break
            t_wait = time.perf_counter()

    def after_step(self, meter: _Meter) -> None:
        """Step-boundary work: metrics, step-based evaluation, periodic checkpoint, the preemption check (all ranks)."""
        if self.step % self.cfg.tracking.log_every_steps == 0 or self.step == self.total_steps:
            self.metrics.log(meter.flush(max(self.scheduler.get_last_lr()), self.world_size, self.flops_per_sample,
                                         self.cfg.engine.peak_tflops, self.train_loader),
                             self.step)  # every rank: one all-reduce, one host read
        every = self.cfg.eval.every_steps
        if every and self.step % every == 0 and self.step < self.total_steps:
            self.run_eval()  # every rank, the same steps: evaluation enters collectives
        if self.preemption.requested():
            self.save_checkpoint()
            logger.warning("preempted at step %d: checkpoint written, exiting with status %d for a requeue",
                           self.step, EXIT_PREEMPTED)
            raise Preempted
        if self.cfg.checkpoint.every_steps and self.step % self.cfg.checkpoint.every_steps == 0:
            self.save_checkpoint()

    def train_micro_step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward, backward and (at accumulation boundaries) the optimizer and scheduler step.

        Returns:
            The micro-batch loss: a scalar on the device, detached (not read back to the host).
        """
        inputs = batch["input"].to(self.device, self.input_dtype, memory_format=self.memory_format)  # B×3×H×W
        with self.acc.accumulate(self.model):
            with self.acc.autocast():
                logits = self.model(inputs)  # B×classes
            loss = self.objective(logits, batch)
            self.acc.backward(loss)
            if self.acc.sync_gradients:
                self.engine.clip_gradients(self.model)
                self.optimizer.step()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update(self.acc.unwrap_model(self.model), step=self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def run_eval(self) -> dict[str, float]:
        """Evaluates the live (and EMA) weights on the validation split and logs ``val/*`` (``val_ema/*``)."""
        dtype = torch.bfloat16 if self.cfg.engine.mixed_precision == "bf16" else None
        nets = {"val": self.acc.unwrap_model(self.model)}
        if self.ema is not None:
            nets["val_ema"] = self.ema.module
        results, logged = {}, {"epoch": float(self.epoch)}
        for prefix, net in nets.items():
            results[prefix] = evaluate(net, self.eval_loader, self.device, dtype, input_dtype=self.input_dtype)
            logged.update({f"{prefix}/{k}": results[prefix][k] for k in ("top1", "top5", "loss")})
        self.metrics.log(logged, self.step)
        self.log_pictures()
        return results["val"]

    def log_pictures(self) -> None:
        """Draws the first ``tracking.pictures`` validation inputs with the model's visualisation (rank 0).

        Each picture goes to MLflow's image panel under a key that is the same at every evaluation
        (``pictures/sample0``, ...), so that its step slider steps through training.
        """
        n, net = self.cfg.tracking.pictures, self.acc.unwrap_model(self.model)
        if not n or not self.acc.is_main_process:
            return
        why = "engine.zero_stage = 3 shards the weights (a forward on rank 0 alone would wait for the other " \
              "ranks' shards)" if self.engine.weights_sharded else why_no_pictures(net)
        if why:
            if not self.pictures_noted:
                logger.info("no model pictures in this run: %s", why)
                self.pictures_noted = True
            return
        batch = next(iter(self.eval_loader), None)
        if batch is None:  # no share of the validation split
            return
        inputs = batch["input"][:n].to(self.device, self.input_dtype)  # images, clips or multi-view clips
        for i, picture in enumerate(render_pictures(net, inputs, self.cfg.data.mean, self.cfg.data.std)):
            self.metrics.log_image(f"pictures/sample{i}", np.asarray(picture.convert("RGB")), self.step)

    # ------------------------------------------------------------ persistence
    def trainer_state(self) -> dict[str, Any]:
        """Counters an exact resume needs besides the state files (weights, optimizer, scheduler, EMA, RNGs)."""
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batch_in_epoch,
                "samples_in_epoch": self.train_loader.position(self.epoch, self.batch_in_epoch),
                "world_size": self.world_size, "backend": self.engine.name,
                "mlflow_run_id": self.mlflow_run_id}

    def find_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest intact checkpoint of the run directory (every rank verifies its share), prepared by the engine.

        Called before the model is prepared, so that the engine can adapt to a checkpoint written by a
        different number of processes (:meth:`pipeline.engine.Engine.resume_from`).

        Raises:
            CheckpointError: When the run has checkpoints but none is intact.
        """
        found = ckpt.choose_checkpoint(self.run_dir / "checkpoints")
        if found is None:
            return None
        return self.engine.resume_from(*found), found[1]

    def record_failed_resume(self, err: Exception) -> None:
        """Marks the run's MLflow run FAILED (main rank) when the job cannot start from its checkpoints."""
        run_id = getattr(err, "run_id", None) or (self.checkpoint[1].get("mlflow_run_id") if self.checkpoint else None)
        if self.acc.is_main_process and run_id and self.cfg.tracking.enabled:
            _mark_run_failed(self.cfg.tracking.uri or default_tracking_uri(self.cfg.run.output_dir), run_id, str(err))

    def resume(self, path: Path, state: dict[str, Any]) -> None:
        """Restores a checkpoint: weights, optimizer, scheduler, EMA, this rank's RNG states and the counters."""
        with weights_only_loads():  # every torch.load (accelerate's, DeepSpeed's) through the weights-only unpickler
            ckpt.load_checkpoint(self.acc, path, self.state_objects, state.get("mlflow_run_id"))
        self.step, self.epoch, self.mlflow_run_id = state["step"], state["epoch"], state["mlflow_run_id"]
        # Samples of the epoch consumed by all ranks (older checkpoints: batches × their world × batch size);
        # exact sampling continues the epoch from there on any number of processes, stream sampling restarts
        # it when the number changed.
        samples = state.get("samples_in_epoch",
                            state["batches_in_epoch"] * state["world_size"] * self.cfg.data.batch_size)
        self.batch_in_epoch = self.train_loader.resume_at(self.epoch, samples, state["world_size"],
                                                          multiple=self.cfg.engine.grad_accum_steps)
        if state["world_size"] != self.world_size:
            logger.warning("resuming %d processes from a checkpoint of %d: epoch %d continues at batch %d after "
                           "%d samples; ranks without a saved RNG state start from fresh seeds", self.world_size,
                           state["world_size"], self.epoch, self.batch_in_epoch, samples)
        logger.info("resumed from %s: step %d, epoch %d, batch %d", path, self.step, self.epoch, self.batch_in_epoch)

    def save_checkpoint(self) -> Path:
        """Saves a step checkpoint; every rank takes part."""
        return ckpt.save_checkpoint(self.acc, self.run_dir / "checkpoints", self.step, self.trainer_state(),
                                    self.cfg.checkpoint.keep_last, self.state_objects)

    def save_final(self) -> None:
        """Saves the last checkpoint, exports the fp32 weights and logs the export to MLflow.

        Every rank helps gather the weights (:meth:`pipeline.engine.Engine.gather_weights`: the same
        tensors ``vitpipe export`` reads from the checkpoint); the main rank writes them while the
        others go on, so that no rank waits in a collective while one reads every shard from disk.
        """
        self.save_checkpoint()
        weights = self.engine.gather_weights(self.model)
        if weights is not None:
            path = write_export(weights, self.run_dir / "final" / "model.safetensors", self.export_info())
            self.metrics.log_artifact(path, "checkpoint")
            self.metrics.log_artifact(self.run_dir / "config.toml")

    def export_info(self) -> dict[str, Any]:
        """What the final export says about itself (model, classes, input, preprocessing, recipe, code version)."""
        return export_info(self.cfg, self.num_classes, recipe=self.recipe_stem, code_version=code_version())

    def register_final(self) -> None:
        """With ``tracking.register_model``: the main rank registers the logged export in MLflow's model registry.

        Called after the run's records are delivered; a registry that fails only warns.
        """
        if not (self.cfg.tracking.register_model and self.acc.is_main_process):
            return
        if not self.mlflow_run_id:  # tracking off, or the store was unreachable at the start
            logger.warning("tracking.register_model = true, but this run has no MLflow run: model not registered")
            return
        uri = self.cfg.tracking.uri or default_tracking_uri(self.cfg.run.output_dir)
        try:
            register_export(uri, self.mlflow_run_id, f"{self.cfg.tracking.experiment}-{self.cfg.model.name}",
                            self.export_info(), self.run_dir)
        except Exception as err:  # noqa: BLE001 - the weights are on disk and logged; the registry is extra
            logger.warning("model not registered in MLflow at %s: %s", uri, err)

    def summary(self, result: dict[str, float], seconds: float, status: str) -> dict[str, Any]:
        """Writes ``summary.json`` (main rank), logs the log file to MLflow and returns the summary."""
        out = {"status": status, "run_dir": str(self.run_dir), "mlflow_run_id": self.mlflow_run_id,
               "tracking_uri": self.cfg.tracking.uri or default_tracking_uri(self.cfg.run.output_dir),
               "model": self.cfg.model.name, "params": self.num_params, "steps": self.step, "epochs": self.epoch,
               "world_size": self.world_size, "seconds": round(seconds, 1),
               "val_top1": result.get("top1"), "val_top5": result.get("top5"), "val_samples": result.get("samples")}
        if self.acc.is_main_process:
            try:
                atomic_write_bytes(self.run_dir / "summary.json", json.dumps(out, indent=2).encode())
            except OSError as err:  # never hides the error that ended the run
                logger.error("could not write %s: %s", self.run_dir / "summary.json", err.strerror or err)
                return out
            self.metrics.log_artifact(self.run_dir / "summary.json")
            self.metrics.log_artifact(self.run_dir / "log.rank0.txt", "logs")
        return out


class _Meter:
    """Running loss and throughput between two metric log lines; the loss sum stays on the device."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss: torch.Tensor | None = None
        self.batches, self.samples, self.wait, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor, samples: int) -> None:
        """Adds a micro-batch's loss (a device scalar) without reading it: float64, like a Python sum."""
        loss = loss.to(torch.float64)
        self.loss = loss if self.loss is None else self.loss + loss
        self.batches, self.samples = self.batches + 1, self.samples + samples

    def flush(self, lr: float, world_size: int, flops_per_sample: float, peak_tflops: float,
              data: Any = None) -> dict[str, float]:
        """Returns loss (mean over ranks), lr, global img/s, data-wait fraction and MFU, then resets.

        The one host read of the step loop: the loss sum and batch count, reduced over ranks on the
        device, then read. MFU counts 3 × forward FLOPs per trained image (forward + backward), over
        ``peak_tflops`` per process.
        """
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        loss_sum, batches, counts = _sum_over_ranks(self.loss, self.batches, data.local_counts() if data else [])
        img_per_s = self.samples * world_size / elapsed
        out = {"train/loss": loss_sum / max(batches, 1.0), "train/lr": lr, "train/img_per_s": img_per_s,
               "train/data_wait": self.wait / elapsed,
               "train/tflops_per_proc": 3 * flops_per_sample * img_per_s / world_size / 1e12}
        if peak_tflops:
            out["train/mfu"] = out["train/tflops_per_proc"] / peak_tflops
        if data is not None:  # the loader's bad-shard and skip counts ride on the same all-reduce
            out.update(data.data_metrics(counts))
        self.reset()
        return out


def _sum_over_ranks(loss_sum: torch.Tensor | None, batches: int,
                    extra: list[float] = ()) -> tuple[float, float, list[float]]:
    """Sums a device loss, a batch count and ``extra`` host numbers over all ranks: one all-reduce, one read."""
    if loss_sum is None:  # no batch since the last flush
        loss_sum = torch.zeros((), dtype=torch.float64)
    tail = torch.tensor([float(batches), *extra], dtype=loss_sum.dtype).to(loss_sum.device, non_blocking=True)
    both = torch.cat([loss_sum.reshape(1), tail])  # [loss sum, batches, *extra], on the device
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
    total, count, *rest = both.tolist()
    return total, count, rest


def _mark_run_failed(uri: str, run_id: str, reason: str) -> None:
    """Ends an MLflow run FAILED with the reason as the ``vitpipe.error`` tag; an unreachable store only warns."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as MlflowLogger: fail fast
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.set_tag(run_id, "vitpipe.error", reason[:4000])
        client.set_terminated(run_id, "FAILED")
        logger.info("MLflow run %s marked FAILED", run_id)
    except Exception as err:  # noqa: BLE001 - tracking never hides the error being reported
        logger.warning("could not mark MLflow run %s FAILED at %s: %s", run_id, uri, err)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
