"""Metrics through one small interface, created on the logging rank only.

``MetricLogger.log(metrics, step)``, ``log_image(key, image, step)`` (MLflow's image panel),
``log_artifact`` and ``close()``; the console and MLflow are two backends in a
container. Other ranks get :class:`NullLogger`, so the trainer never checks the rank itself. MLflow
records are delivered by a background thread (:class:`MlflowLogger`): logging costs the training step
the time to queue a record, whatever the store or server does.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Protocol

from data_prep.format import atomic_write_bytes

logger = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000
"""MLflow's limit on the metrics of one ``log_batch`` request."""


class MetricLogger(Protocol):
    """What the trainer logs through."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Records scalar metrics at an optimizer step."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Stores a file with the run."""

    def log_image(self, key: str, image: Any, step: int) -> None:
        """Records a picture at an optimizer step, for MLflow's image panel and its step slider.

        Args:
            key: The picture's name (letters, digits, ``_ - . /`` and spaces), e.g. ``"pictures/attention"``.
            image: A ``uint8`` numpy array of shape ``(H, W, 3)`` (RGB).
            step: The optimizer step.
        """

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Ends the run, delivering what is queued (waiting at most ``timeout_s``; None: no limit)."""

    def save_pending(self) -> None:
        """Saves what is not delivered yet, at once (before a forced exit)."""


class NullLogger:
    """The logger of non-logging ranks: does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def log_image(self, key: str, image: Any, step: int) -> None:  # noqa: D102
        pass

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:  # noqa: D102
        pass

    def save_pending(self) -> None:  # noqa: D102
        pass


class ConsoleLogger(NullLogger):
    """Writes metrics as one log line per call."""

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        logger.info("step %d  %s", step, text)


def _fmt(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class LoggerContainer(NullLogger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = loggers
        self.run_id = next((lg.run_id for lg in loggers if lg.run_id), None)

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.log_artifact(path, artifact_path)

    def log_image(self, key: str, image: Any, step: int) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.log_image(key, image, step)

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.close(status, timeout_s)

    def save_pending(self) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.save_pending()


def default_tracking_uri(output_dir: str | Path) -> str:
    """The project's SQLite tracking store under the runs directory."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true"}
"""What turns MLflow's telemetry off, for the tracking client and the UI server (``setdefault``: a user who
sets ``MLFLOW_DISABLE_TELEMETRY=false`` turns it on). Importable without torch (``vitpipe ui``)."""

EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
"""The experiment tag from which MLflow's UI picks its view: the training view (runs table, charts, images)."""

PERMANENT_ERRORS = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"})
"""MLflow error codes that no retry can fix: the record is dropped with a warning instead of blocking the queue."""


def telemetry_off(env: MutableMapping[str, str] = os.environ) -> None:
    """Turns MLflow's telemetry off in ``env`` unless the user set the variable (before ``import mlflow``)."""
    for key, value in TELEMETRY_ENV.items():
        env.setdefault(key, value)


telemetry_off()  # any later ``import mlflow`` in this process (trainer, export, Slurm task) starts without it


class MlflowLogger(NullLogger):
    """One MLflow run; created on rank 0 only. Records are delivered by a background thread.

    ``log``, ``log_image`` and ``log_artifact`` only queue a record and return: the training step never
    waits for the store. A sender thread delivers the queue in order (consecutive metric records merged
    into batches of up to 1,000 metrics). Tracking never stops training and loses nothing:

    * When the store or server cannot be reached, the records stay queued, one warning is logged per
      outage, delivery is retried with a back-off (1 s doubling to 30 s) and resumes, in order, once it
      answers again.
    * What is still undelivered at :meth:`close` (after one last try), or at a forced exit
      (:meth:`save_pending`), is written to ``pending_file`` (JSON; images as PNG files in
      ``<pending_file stem>.images/``). The next job of the run directory (a preempted job's requeue)
      loads that file and sends it first; the file is deleted (``unlink``) once the queue is empty.
    * A resumed job does not log a step twice: the sender records, per metric key, the last step
      delivered in ``<pending_file dir>/mlflow_state.json`` (atomically, after every batch). At start, a
      resumed run's floor per key is the highest of that file, the pending file and the server's latest
      metrics (one ``get_run``); :meth:`log` drops a metric whose step is at or below its floor, so the
      steps between the checkpoint and the previous job's last record are not logged again (the first
      values stay). Replayed records already delivered (the state file says so) are dropped too.
    * System metrics (``system/…``: CPU, memory, disk, network, GPU; MLflow's monitors) are sampled by
      a thread of this logger and go through the same queue: they are queued during an outage and
      continue after it (MLflow's own ``SystemMetricsMonitor`` stops for good at the first failure).
      A resumed job continues their step numbering.
    * A record the store rejects for good (an invalid value, a deleted run, a vanished file) is dropped
      with a warning instead of blocking the queue.

    MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) is not used: it drops a
    batch whose delivery fails instead of keeping it for later.

    Args:
        uri: Tracking URI.
        experiment: Experiment name (created on first use with the training kind tag, artifacts under
            ``<store dir>/mlartifacts``).
        run_name: Name of the run.
        params: Flat parameters to log (the resolved config).
        tags: Tags to set.
        run_id: An existing run to continue (a resumed job); its parameters are not logged again. When
            the server cannot be reached at start, the run is reopened once it answers.
        system_metrics_s: Sampling interval of the system metrics; 0: off.
        pending_file: Where undeliverable records go (and where the next job finds them).
    """

    retry_s = (1.0, 30.0)
    """First and longest wait before delivery is tried again during an outage."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None, system_metrics_s: float = 0.0, pending_file: Path | None = None):
        # Fail fast instead of MLflow's default minutes of HTTP retries, and retry ourselves later.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        telemetry_off()
        from mlflow.tracking import MlflowClient

        self.client, self.uri = MlflowClient(uri), uri
        self.pending: list[tuple[str, tuple, str]] = []  # (kind, args, run id)
        self.pending_file, self.outage = pending_file, False
        self.state_file = pending_file.with_name("mlflow_state.json") if pending_file else None
        # An RLock: save_pending may run in a signal handler on the main thread while it holds the lock.
        self._cond = threading.Condition(threading.RLock())
        self._closing, self._file_on_disk, self._skipped = False, False, 0
        self._state_steps: dict[str, int] = {}
        self.run_id = run_id if run_id and self._reopen(run_id) else None
        if self.run_id is None:
            self.run_id = self.client.create_run(self._experiment_id(experiment), run_name=run_name,
                                                 tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=_params(params))
        resumed = self.run_id == run_id
        replay = self._load_pending()
        self.floor = self._logged_steps(replay) if resumed else {}
        self._delivered = dict(self.floor)
        self.pending[:0] = self._not_delivered(replay)  # the head of the queue: sent first
        self._sender = threading.Thread(target=self._deliver, name="mlflow-sender", daemon=True)
        self._sender.start()
        first = max((s for k, s in self.floor.items() if k.startswith("system/")), default=-1) + 1
        self.sampler = _SystemSampler(self, system_metrics_s, first) if system_metrics_s > 0 else None
        logger.info("MLflow run %s (experiment %r) at %s", self.run_id, experiment, uri)

    # ------------------------------------------------------------------ start
    def _experiment_id(self, name: str) -> str:
        """The experiment's id, created with the training kind tag (or given the tag when it has none)."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name, artifact_location=_artifact_root(self.uri),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        if EXPERIMENT_KIND_TAG not in exp.tags:
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id

    def _reopen(self, run_id: str) -> bool:
        """Marks an existing run RUNNING again (queued while the server is down); False when the store lacks it."""
        from mlflow.exceptions import MlflowException

        try:
            self._mark_resumed(run_id)
        except MlflowException as err:
            if err.error_code in PERMANENT_ERRORS:
                logger.warning("cannot continue MLflow run %s (%s): starting a new run", run_id, err)
                return False
            logger.warning("MLflow unreachable at start (%s): run %s is reopened once it answers", err, run_id)
            self.outage = True
            self.pending.append(("reopen", (), run_id))
        return True

    def _mark_resumed(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "vitpipe.resumed", "true")
        exp_id = self.client.get_run(run_id).info.experiment_id
        if EXPERIMENT_KIND_TAG not in self.client.get_experiment(exp_id).tags:
            self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def _load_pending(self) -> list[tuple[str, tuple, str]]:
        """The records a previous job of the run directory could not deliver (its pending file)."""
        if self.pending_file is None or not self.pending_file.exists():
            return []
        try:
            saved = json.loads(self.pending_file.read_text())
            records = [_decode(r, saved["run_id"], _image_dir(self.pending_file)) for r in saved["records"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            bad = self.pending_file.with_suffix(".bad.json")
            os.replace(self.pending_file, bad)
            logger.error("unreadable MLflow pending file (%s): moved to %s, not replayed", err, bad)
            return []
        self._file_on_disk = True
        found = [r for r in records if r is not None]
        logger.warning("sending %d MLflow records a previous job could not deliver (%s)", len(found),
                       self.pending_file)
        return found

    def _logged_steps(self, replay: list[tuple[str, tuple, str]]) -> dict[str, int]:
        """Per metric key, the last step the run already has.

        Delivered (the state file, and the server's latest metrics for a state file behind a SIGKILL)
        or saved for replay (the pending file).
        """
        steps: dict[str, int] = {}
        state = _read_json(self.state_file)
        if state.get("run_id") == self.run_id:
            _merge(steps, state.get("steps", {}).items())
        _merge(steps, (self._server_steps() or {}).items())
        self._state_steps = dict(steps)
        _merge(steps, ((m.key, m.step) for kind, args, rid in replay if kind == "metrics" and rid == self.run_id
                       for m in args[0]))
        return steps

    def _server_steps(self) -> dict[str, int] | None:
        """The run's latest step per metric key on the server (one ``get_run``); None when unreachable.

        Records are delivered in order, so a metric at or below its key's latest step was delivered.
        """
        try:
            return {m.key: int(m.step) for m in self.client.get_run(self.run_id).data._metric_objs}
        except Exception as err:  # noqa: BLE001 - unreachable: the state file is the record
            logger.debug("latest metrics of %s not read: %s", self.run_id, err)
            return None

    def _drop_delivered(self, latest: dict[str, int]) -> None:
        """Removes from the queue the metrics the server has (a request that timed out but was stored)."""
        with self._cond:
            kept = []
            for kind, args, rid in self.pending:
                if kind == "metrics" and rid == self.run_id:
                    args = ([m for m in args[0] if m.step > latest.get(m.key, -1)],)
                    if not args[0]:
                        continue
                kept.append((kind, args, rid))
            self.pending[:] = kept

    def _not_delivered(self, replay: list[tuple[str, tuple, str]]) -> list[tuple[str, tuple, str]]:
        """The replayed records still to send.

        Dropped: metrics the state file says were delivered (an exit's race), and the previous job's end
        or reopening of this run (this job reopens it).
        """
        done, out = self._state_steps, []
        for kind, args, rid in replay:
            if kind in ("terminate", "reopen") and rid == self.run_id:
                continue
            if kind == "metrics" and rid == self.run_id:
                left = [m for m in args[0] if m.step > done.get(m.key, -1)]
                if left:
                    out.append((kind, (left,), rid))
            else:
                out.append((kind, args, rid))
        return out

    # ------------------------------------------------------------ the sender thread
    def _deliver(self) -> None:
        """The sender thread: delivers the queue; during an outage, retries after a growing wait."""
        wait = self.retry_s[0]
        while True:
            with self._cond:
                retry_at = time.monotonic() + wait if self.outage else 0.0
                while not self._closing and (not self.pending or time.monotonic() < retry_at):
                    self._cond.wait(None if not self.pending else max(retry_at - time.monotonic(), 0.0))
                closing = self._closing
            self._send()
            wait = min(wait * 2, self.retry_s[1]) if self.outage else self.retry_s[0]
            if closing:
                return  # the last try is made: close() saves what is left

    def _send(self) -> None:
        """Sends the queue in order; stops at the first failure and keeps the rest (sender thread only).

        After an outage, the server's latest steps are read first (one request): a batch whose request
        timed out on the client but was stored anyway is not sent twice.
        """
        from mlflow.exceptions import MlflowException

        if self.outage:
            latest = self._server_steps()
            if latest is None:
                return
            self._drop_delivered(latest)
        while True:
            with self._cond:
                if not self.pending:
                    return
                count, (kind, args, run_id) = _next_request(self.pending)
            try:
                self._request(kind, args, run_id)
            except (MlflowException, _Gone) as err:
                if isinstance(err, MlflowException) and err.error_code not in PERMANENT_ERRORS:
                    self._went_away(err)
                    return
                logger.warning("MLflow record dropped (%s %s): %s", kind, _what(kind, args), err)
            except Exception as err:  # noqa: BLE001 - any failure of the store: keep training
                self._went_away(err)
                return
            if kind == "metrics" and run_id == self.run_id:
                self._record_delivered(args[0])
            with self._cond:
                del self.pending[:count]
                if not self.pending and self._file_on_disk:
                    self._remove_pending_file()
            if self.outage:
                logger.warning("MLflow answers again: sending queued records")
                self.outage = False

    def _went_away(self, err: Exception) -> None:
        if not self.outage:
            logger.warning("MLflow unreachable (%s): queueing records until it answers", err)
        self.outage = True

    def _request(self, kind: str, args: tuple, run_id: str) -> None:
        """One request to the store (sender thread only)."""
        if kind == "metrics":
            self.client.log_batch(run_id, metrics=args[0])
        elif kind == "image":
            key, image, step, ts, _ = args
            self.client.log_image(run_id, image, key=key, step=step, timestamp=ts, synchronous=True)
        elif kind == "artifact":
            if not Path(args[0]).exists():
                raise _Gone(f"{args[0]} no longer exists")
            self.client.log_artifact(run_id, *args)
        elif kind == "reopen":
            self._mark_resumed(run_id)
        elif kind == "terminate":
            self.client.set_terminated(run_id, status=args[0])

    def _record_delivered(self, metrics: list) -> None:
        """Advances the last delivered step per key and writes the state file (sender thread only)."""
        _merge(self._delivered, ((m.key, m.step) for m in metrics))
        if self.state_file is not None:
            atomic_write_bytes(self.state_file, json.dumps({"run_id": self.run_id, "steps": self._delivered}).encode())

    # ------------------------------------------------------------------ the interface
    def log(self, metrics: dict[str, float], step: int) -> None:
        """Queues scalar metrics at a step; a metric of a step the run already has (a resume) is dropped."""
        kept = {k: v for k, v in metrics.items() if step > self.floor.get(k, -1)}
        if len(kept) < len(metrics):
            if not self._skipped:
                logger.info("step %d and earlier were logged by the previous job: not logged again", step)
            self._skipped += len(metrics) - len(kept)
        if kept:
            self.queue_metrics(kept, step)

    def queue_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queues metrics as they are (no resume filter: the system sampler's own steps)."""
        from mlflow.entities import Metric

        ts = _now_ms()
        self._queue(("metrics", ([Metric(k, float(v), ts, step) for k, v in metrics.items()],), self.run_id))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        self._queue(("artifact", (str(path), artifact_path), self.run_id))

    def log_image(self, key: str, image: Any, step: int) -> None:
        """Queues a picture for MLflow's image panel (``MlflowClient.log_image(key=, step=)``).

        Stored by MLflow as ``images/<key, / as ~>+step+<step>+timestamp+…png`` (and a ``.webp``
        thumbnail), which the run's Images panel shows with a step slider.

        Args:
            key: The picture's name (letters, digits, ``_ - . /`` and spaces).
            image: A ``uint8`` numpy array of shape ``(H, W, 3)`` (RGB); copied, so the caller may reuse it.
            step: The optimizer step.
        """
        import numpy as np

        array = np.array(image, dtype=np.uint8, copy=True)
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"log_image({key!r}): expected an H×W×3 uint8 array, got shape {array.shape}")
        self._queue(("image", (key, array, int(step), _now_ms(), f"{uuid.uuid4().hex}.png"), self.run_id))

    def _queue(self, record: tuple[str, tuple, str]) -> None:
        with self._cond:
            self.pending.append(record)
            self._cond.notify()

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Delivers what is queued, marks the run ``status`` and saves what could not be delivered.

        Args:
            status: The run's final status.
            timeout_s: Longest wait for the delivery (a preempted job's deadline); None: until the
                sender's last try ends (each request gives up after ``MLFLOW_HTTP_REQUEST_TIMEOUT``).
        """
        if self.sampler is not None:
            self.sampler.stop()
        if self._skipped:
            logger.info("%d metrics of steps the previous job had logged were not logged again", self._skipped)
        self._queue(("terminate", (status,), self.run_id))
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._sender.join(timeout_s)
        if self._sender.is_alive():
            logger.warning("MLflow delivery still running after %.0f s: saving the queue", timeout_s)
        self.save_pending()

    def save_pending(self) -> None:
        """Writes the records not delivered yet to ``pending_file`` (any thread, signal handlers too).

        Metrics and artifact paths go to the JSON file, images to PNG files beside it; an empty queue
        removes a pending file left from before.
        """
        locked = self._cond.acquire(timeout=2.0)
        try:
            records = list(self.pending)
            if self.pending_file is None or not records:
                if self.pending_file is not None and self._file_on_disk:
                    self._remove_pending_file()
                if records:
                    logger.error("%d MLflow records could not be delivered (no pending file)", len(records))
                return
            folder = _image_dir(self.pending_file)
            saved = {"run_id": self.run_id, "records": [_encode(r, folder) for r in records]}
            atomic_write_bytes(self.pending_file, json.dumps(saved).encode())
            self._file_on_disk = True
        finally:
            if locked:
                self._cond.release()
        logger.error("%d MLflow records could not be delivered; saved to %s (sent by the next job of this run)",
                     len(records), self.pending_file)

    def _remove_pending_file(self) -> None:
        """Deletes the pending file (one unlink) and then its images; called with the lock held."""
        assert self.pending_file is not None
        self.pending_file.unlink(missing_ok=True)
        shutil.rmtree(_image_dir(self.pending_file), ignore_errors=True)
        self._file_on_disk = False


class _Gone(Exception):
    """A record whose content no longer exists (an artifact file deleted since): dropped."""


class _SystemSampler:
    """Samples MLflow's system monitors every ``interval`` s and queues them as ``system/…`` metrics.

    Nothing here talks to the server: samples queue like any record, so an outage delays them and
    loses none, and sampling goes on through it.
    """

    def __init__(self, owner: MlflowLogger, interval: float, first_step: int) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.source = SystemMetricsMonitor(owner.run_id, sampling_interval=interval, tracking_uri=owner.uri)
        self.prefix = "system/" + (f"{self.source.node_id}/" if self.source.node_id else "")
        self.owner, self.interval, self.step = owner, float(self.source.sampling_interval), first_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.source.collect_metrics()
                if self._stop.wait(self.interval):
                    return
                metrics = self.source.aggregate_metrics()
                for monitor in self.source.monitors:
                    monitor.clear_metrics()
            except Exception as err:  # noqa: BLE001 - a failing probe never stops training
                logger.warning("system metrics stopped: %s", err)
                return
            self.owner.queue_metrics({self.prefix + k: v for k, v in metrics.items()}, self.step)
            self.step += 1

    def stop(self) -> None:
        """Ends sampling (the sample in progress is dropped)."""
        self._stop.set()
        self._thread.join(5.0)


def _next_request(pending: list[tuple[str, tuple, str]]) -> tuple[int, tuple[str, tuple, str]]:
    """The next request from the head of the queue: one record, or consecutive metric records of a run merged.

    Returns:
        ``(records it covers, (kind, args, run id))``.
    """
    kind, args, run_id = pending[0]
    if kind != "metrics":
        return 1, pending[0]
    merged, count = list(args[0]), 1
    while count < len(pending) and pending[count][0] == "metrics" and pending[count][2] == run_id \
            and len(merged) + len(pending[count][1][0]) <= MAX_METRICS_PER_BATCH:
        merged += pending[count][1][0]
        count += 1
    return count, ("metrics", (merged,), run_id)


def _encode(record: tuple[str, tuple, str], image_dir: Path) -> dict[str, Any]:
    """A queue record as JSON; an image is written (once) as a PNG file in ``image_dir``."""
    kind, args, run_id = record
    if kind == "metrics":
        out: list[Any] = [[[m.key, m.value, m.step, m.timestamp] for m in args[0]]]
    elif kind == "image":
        key, image, step, ts, name = args
        if not (image_dir / name).exists():
            import PIL.Image

            image_dir.mkdir(exist_ok=True)
            buf = io.BytesIO()
            PIL.Image.fromarray(image).save(buf, format="PNG")
            atomic_write_bytes(image_dir / name, buf.getvalue())
        out = [key, name, step, ts]
    else:
        out = list(args)
    return {"kind": kind, "args": out, "run_id": run_id}


def _decode(saved: dict[str, Any], default_run: str, image_dir: Path) -> tuple[str, tuple, str] | None:
    """A record of the pending file; None (with a warning) for an image whose PNG is gone."""
    from mlflow.entities import Metric

    kind, args, run_id = saved["kind"], saved["args"], saved.get("run_id", default_run)
    if kind == "metrics":
        now = _now_ms()
        metrics = [Metric(m[0], float(m[1]), int(m[3]) if len(m) > 3 else now, int(m[2])) for m in args[0]]
        return kind, (metrics,), run_id
    if kind == "image":
        import numpy as np
        import PIL.Image

        key, name, step, ts = args
        try:
            with PIL.Image.open(image_dir / Path(name).name) as img:
                image = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except OSError as err:
            logger.warning("pending MLflow image %s at step %s not replayed: %s", key, step, err)
            return None
        return kind, (key, image, int(step), int(ts), Path(name).name), run_id
    if kind not in ("artifact", "reopen", "terminate"):
        raise ValueError(f"unknown record kind {kind!r}")
    return kind, tuple(args), run_id


def _image_dir(pending_file: Path) -> Path:
    return pending_file.with_name(pending_file.stem + ".images")


def _what(kind: str, args: tuple) -> str:
    if kind == "metrics":
        return f"{len(args[0])} metrics at steps {args[0][0].step}–{args[0][-1].step}" if args[0] else ""
    return str(args[0]) if kind in ("artifact", "image") else ""


def _read_json(path: Path | None) -> dict[str, Any]:
    """A small JSON file as a dict; {} when missing or unreadable (with a warning)."""
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("ignoring unreadable %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _merge(steps: dict[str, int], pairs: Any) -> None:
    """Raises ``steps[key]`` to each ``(key, step)`` of ``pairs``."""
    for key, step in pairs:
        steps[key] = max(steps.get(key, -1), int(step))


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
