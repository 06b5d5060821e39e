"""Metrics through one small interface, created on the logging rank only.

``MetricLogger.log(metrics, step)`` and ``close()``; the console and MLflow are two backends in a
container. Other ranks get :class:`NullLogger`, so the trainer never checks the rank itself.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class MetricLogger(Protocol):
    """What the trainer logs through."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Records scalar metrics at an optimizer step."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Stores a file with the run."""

    def close(self, status: str = "FINISHED") -> None:
        """Ends the run."""


class NullLogger:
    """The logger of non-logging ranks: does nothing."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def close(self, status: str = "FINISHED") -> None:  # noqa: D102
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

    def close(self, status: str = "FINISHED") -> None:  # noqa: D102
        for lg in self.loggers:
            lg.close(status)


def default_tracking_uri(output_dir: str | Path) -> str:
    """The project's SQLite tracking store under the runs directory."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowLogger(NullLogger):
    """One MLflow run; created on rank 0 only.

    Tracking never stops training: when the store or server cannot be reached, metrics and artifacts
    are queued with one warning per outage and sent, in order, once it answers again; whatever is
    still queued at the end is written to ``pending_file`` and reported.

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

    def _send(self) -> None:
        """Sends the queue in order; stops at the first failure and keeps the rest."""
        while self.pending:
            kind, args = self.pending[0]
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
            self.pending.pop(0)
            if self.outage:
                logger.warning("MLflow answers again: sending queued records")
                self.outage = False

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        from mlflow.entities import Metric

        ts = _now_ms()
        self.pending.append(("metrics", ([Metric(k, float(v), ts, step) for k, v in metrics.items()],)))
        self._send()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        self.pending.append(("artifact", (str(path), artifact_path)))
        self._send()

    def close(self, status: str = "FINISHED") -> None:  # noqa: D102
        if self.monitor is not None:
            self.monitor.finish()
        self._send()
        try:
            self.client.set_terminated(self.run_id, status=status)
        except Exception as err:  # noqa: BLE001
            logger.warning("could not mark MLflow run %s %s: %s", self.run_id, status, err)
        if self.pending:
            self._dump_pending()

    def _dump_pending(self) -> None:
        records = [{"kind": k, "args": [[(m.key, m.value, m.step) for m in a[0]]] if k == "metrics" else list(a)}
                   for k, a in self.pending]
        if self.pending_file is not None:
            self.pending_file.write_text(json.dumps({"run_id": self.run_id, "records": records}))
        logger.error("%d MLflow records could not be delivered; saved to %s", len(records), self.pending_file)


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
