"""Metrics through one small interface, created on the logging rank only.

``MetricLogger.log(metrics, step)`` and ``close()``; the console and MLflow are two backends in a
container. Other ranks get :class:`NullLogger`, so the trainer never checks the rank itself. MLflow
records are delivered by a background thread (:class:`MlflowLogger`): logging costs the training step
the time to queue a record, whatever the store or server does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
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

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.close(status, timeout_s)

    def save_pending(self) -> None:  # noqa: D102
        for lg in self.loggers:
            lg.save_pending()


def default_tracking_uri(output_dir: str | Path) -> str:
    """The project's SQLite tracking store under the runs directory."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowLogger(NullLogger):
    """One MLflow run; created on rank 0 only. Records are delivered by a background thread.

    ``log`` and ``log_artifact`` only queue a record and return: the training step never waits for
    the store. A sender thread delivers the queue in order (consecutive metric records merged into
    batches of up to 1,000 metrics). Tracking never stops training: when the store or server cannot
    be reached, the records stay queued, one warning is logged per outage, delivery is retried with a
    back-off (1 s doubling to 30 s) and resumes, in order, once it answers again. :meth:`close` sends
    what is queued (one last try even during an outage), and whatever is still undelivered is written
    to ``pending_file`` and reported; :meth:`save_pending` writes it at once (a forced exit).

    MLflow's own asynchronous logging (``log_batch(..., synchronous=False)``) is not used: it drops a
    batch whose delivery fails instead of keeping it for later.

    Args:
        uri: Tracking URI.
        experiment: Experiment name (created on first use, artifacts under ``<store dir>/mlartifacts``).
        run_name: Name of the run.
        params: Flat parameters to log (the resolved config).
        tags: Tags to set.
        run_id: An existing run to continue (a resumed job); its parameters are not logged again.
        system_metrics_s: Sampling interval of MLflow's system-metrics monitor (CPU, memory, GPU); 0: off.
        pending_file: Where undeliverable records go at the end.
    """

    retry_s = (1.0, 30.0)
    """First and longest wait before delivery is tried again during an outage."""

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None, system_metrics_s: float = 0.0, pending_file: Path | None = None):
        # Fail fast instead of MLflow's default minutes of HTTP retries, and retry ourselves later.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.client, self.uri = MlflowClient(uri), uri
        self.pending: list[tuple[str, tuple]] = []
        self.pending_file, self.outage = pending_file, False
        self.run_id = run_id if run_id and self._reopen(run_id) else None
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(uri))
            else:
                exp_id = exp.experiment_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=_params(params))
        self.monitor = self._start_monitor(system_metrics_s, resumed=run_id == self.run_id)
        # An RLock: save_pending may run in a signal handler on the main thread while it holds the lock.
        self._cond = threading.Condition(threading.RLock())
        self._closing = False
        self._sender = threading.Thread(target=self._deliver, name="mlflow-sender", daemon=True)
        self._sender.start()
        logger.info("MLflow run %s (experiment %r) at %s", self.run_id, experiment, uri)

    def _reopen(self, run_id: str) -> bool:
        """Marks an existing run RUNNING again; False (with a warning) when the store does not have it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException as err:
            logger.warning("cannot continue MLflow run %s (%s): starting a new run", run_id, err)
            return False
        self.client.set_tag(run_id, "vitpipe.resumed", "true")
        return True

    def _start_monitor(self, interval: float, resumed: bool) -> Any:
        if interval <= 0:
            return None
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, resume_logging=resumed,
                                       tracking_uri=self.uri)
        monitor.start()
        return monitor

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
        """Sends the queue in order; stops at the first failure and keeps the rest (sender thread only)."""
        while True:
            with self._cond:
                if not self.pending:
                    return
                count, (kind, args) = _next_request(self.pending)
            try:
                if kind == "metrics":
                    self.client.log_batch(self.run_id, metrics=args[0])
                else:
                    self.client.log_artifact(self.run_id, *args)
            except Exception as err:  # noqa: BLE001 - any failure of the store: keep training
                if not self.outage:
                    logger.warning("MLflow unreachable (%s): queueing records until it answers", err)
                self.outage = True
                return
            with self._cond:
                del self.pending[:count]
            if self.outage:
                logger.warning("MLflow answers again: sending queued records")
                self.outage = False

    # ------------------------------------------------------------------ the interface
    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        from mlflow.entities import Metric

        ts = _now_ms()
        self._queue(("metrics", ([Metric(k, float(v), ts, step) for k, v in metrics.items()],)))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        self._queue(("artifact", (str(path), artifact_path)))

    def _queue(self, record: tuple[str, tuple]) -> None:
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
        if self.monitor is not None:
            self.monitor.finish()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._sender.join(timeout_s)
        if self._sender.is_alive():
            logger.warning("MLflow delivery still running after %.0f s: saving the queue", timeout_s)
        else:
            try:
                self.client.set_terminated(self.run_id, status=status)
            except Exception as err:  # noqa: BLE001
                logger.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)
        if self.pending:
            self.save_pending()

    def save_pending(self) -> None:
        """Writes the records not delivered yet to ``pending_file`` (any thread, signal handlers too)."""
        locked = self._cond.acquire(timeout=2.0)
        try:
            records = [{"kind": k, "args": [[(m.key, m.value, m.step) for m in a[0]]] if k == "metrics" else list(a)}
                       for k, a in list(self.pending)]
        finally:
            if locked:
                self._cond.release()
        if not records:
            return
        if self.pending_file is not None:
            atomic_write_bytes(self.pending_file, json.dumps({"run_id": self.run_id, "records": records}).encode())
        logger.error("%d MLflow records could not be delivered; saved to %s", len(records), self.pending_file)


def _next_request(pending: list[tuple[str, tuple]]) -> tuple[int, tuple[str, tuple]]:
    """The next request from the head of the queue: an artifact, or consecutive metric records merged.

    Returns:
        ``(records it covers, (kind, args))``.
    """
    kind, args = pending[0]
    if kind != "metrics":
        return 1, (kind, args)
    merged, count = list(args[0]), 1
    while count < len(pending) and pending[count][0] == "metrics" \
            and len(merged) + len(pending[count][1][0]) <= MAX_METRICS_PER_BATCH:
        merged += pending[count][1][0]
        count += 1
    return count, ("metrics", (merged,))


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
