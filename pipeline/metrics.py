"""Metrics through one small interface, created on the logging rank only.

``MetricLogger.log(metrics, step)`` and ``close()``; the console and MLflow are two backends in a
container. Other ranks get :class:`NullLogger`, so the trainer never checks the rank itself.
"""

from __future__ import annotations

import logging
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

    Args:
        uri: Tracking URI.
        experiment: Experiment name (created on first use, artifacts under ``<store dir>/mlartifacts``).
        run_name: Name of the run.
        params: Flat parameters to log (the resolved config).
        tags: Tags to set.
        run_id: An existing run to continue (a resumed job); its parameters are not logged again.
    """

    def __init__(self, uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(uri)
        self.run_id = run_id if run_id and self._reopen(run_id) else None
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=_artifact_root(uri))
            else:
                exp_id = exp.experiment_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=_params(params))
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

    def log(self, metrics: dict[str, float], step: int) -> None:  # noqa: D102
        from mlflow.entities import Metric

        ts = _now_ms()
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:  # noqa: D102
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def close(self, status: str = "FINISHED") -> None:  # noqa: D102
        self.client.set_terminated(self.run_id, status=status)


def _artifact_root(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def _params(params: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)
