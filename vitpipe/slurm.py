"""Slurm batch scripts: cluster defaults (``slurm/cluster.toml``) and safe rendering of the templates.

A template in ``slurm/`` is a bash script with three placeholder comment lines, each replaced when
the script is rendered:

* ``#@vitpipe sbatch@``: the ``#SBATCH`` options. Slurm reads these lines with its own small parser
  (unquoted whitespace separates, quotes group, a backslash escapes the next character, an unquoted
  ``#`` starts a comment), so a value with any character outside a plain set is written in double
  quotes with its backslashes and double quotes escaped.
* ``#@vitpipe settings@``: shell variable assignments (the job's recipe, overrides, run directory...),
  every value through :func:`shlex.quote`, lists as bash arrays.
* ``#@vitpipe setup@``: the cluster's environment set-up: ``module load``, the ``setup`` lines of the
  cluster file (shell written by the cluster's user, kept as they are) and ``export`` of ``[env]``.

No value that comes from a recipe, an override or the command line is ever written unquoted, so a
run name such as ``a'b $(touch /tmp/x)`` stays text. The template's own ``#SBATCH`` lines (defaults
for running it by hand) are dropped from the rendered script.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vitpipe.errors import UserError

logger = logging.getLogger("vitpipe")

ROOT = Path(__file__).resolve().parents[1]
"""The vitpipe checkout (holds ``slurm/`` with the templates and the default cluster file)."""

PLACEHOLDERS = ("#@vitpipe sbatch@", "#@vitpipe settings@", "#@vitpipe setup@")
_SBATCH_PLAIN = re.compile(r"[A-Za-z0-9_./:@%+,=-]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(kw_only=True)
class SlurmCfg:
    """``[slurm]``: resources of training jobs."""

    partition: str = ""
    """Partition; empty: the cluster's default."""
    account: str = ""
    """Account to charge; empty: the user's default."""
    qos: str = ""
    """Quality of service; empty: none requested."""
    time: str = "24:00:00"
    """Time limit of training jobs."""
    gpus_per_node: int = 0
    """GPUs per node when ``--gpus-per-node`` is not given (one trainer per GPU; 0: one CPU trainer per node)."""
    cpus_per_task: int = 0
    """CPUs per srun task (one task per node); 0: not requested."""
    mem: str = ""
    """Memory per node (``480G``; ``0`` = all); empty: not requested."""
    constraint: str = ""
    """Node features (``--constraint``)."""
    exclusive: bool = False
    """Request whole nodes."""
    extra: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, each ``--name=value`` or ``--flag``."""


@dataclass(kw_only=True)
class RequeueCfg:
    """``[requeue]``: preemption signal and the bound on self-requeues."""

    signal_lead_s: int = 120
    """SIGUSR1 this many seconds before the time limit."""
    max_requeues: int = 3
    """A job requeues itself at most this many times."""


@dataclass(kw_only=True)
class EnvironmentCfg:
    """``[environment]``: how a job gets its software."""

    python: str = ""
    """Interpreter in the jobs; empty: the one running vitpipe."""
    modules: list[str] = field(default_factory=list)
    """Environment modules to load, in order."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job (written as they are)."""


@dataclass(kw_only=True)
class EvalCfg:
    """``[eval]``: resources of evaluation jobs."""

    time: str = "02:00:00"
    """Time limit."""
    cpus_per_task: int = 8
    """CPUs of the one task."""


@dataclass(kw_only=True)
class PrepCfg:
    """``[prep]``: the data-prep job array and its merge job."""

    tasks: int = 16
    """Array tasks."""
    throttle: int = 8
    """Tasks running at once; 0: no limit."""
    cpus_per_task: int = 32
    """Processes per task."""
    mem: str = "64G"
    """Memory per task."""
    time: str = "08:00:00"
    """Time limit of a task."""
    merge_time: str = "02:00:00"
    """Time limit of the merge job."""


@dataclass(kw_only=True)
class ClusterCfg:
    """The cluster defaults: one TOML file, sections as the fields below."""

    slurm: SlurmCfg = field(default_factory=SlurmCfg)
    requeue: RequeueCfg = field(default_factory=RequeueCfg)
    environment: EnvironmentCfg = field(default_factory=EnvironmentCfg)
    env: dict[str, str] = field(default_factory=dict)
    eval: EvalCfg = field(default_factory=EvalCfg)
    prep: PrepCfg = field(default_factory=PrepCfg)
    path: str = ""
    """The file it was read from ("" for the built-in defaults)."""

    @property
    def python(self) -> str:
        """The interpreter the jobs run."""
        return self.environment.python or sys.executable


def default_cluster_file() -> Path:
    """``$VITPIPE_CLUSTER``, else ``./slurm/cluster.toml`` when it exists, else the package checkout's.

    The working copy's file comes first: a user edits the clone they run from, which need not be the
    checkout vitpipe was installed from.
    """
    if os.environ.get("VITPIPE_CLUSTER"):
        return Path(os.environ["VITPIPE_CLUSTER"])
    here = Path("slurm") / "cluster.toml"
    return here.resolve() if here.is_file() else ROOT / "slurm" / "cluster.toml"


def load_cluster(path: str | Path | None = None) -> ClusterCfg:
    """Reads the cluster defaults, checking every key and type.

    Args:
        path: The TOML file (``--cluster FILE``); None: :func:`default_cluster_file` (built-in defaults
            when that is missing). The file used is logged.

    Raises:
        UserError: For a missing explicit file, bad TOML, an unknown key or a wrong type.
    """
    file = Path(path) if path else default_cluster_file()
    if not file.is_file():
        if path:
            raise UserError(f"cluster file {str(file)!r} not found")
        logger.info("cluster defaults: built in (no %s)", file)
        return ClusterCfg()
    logger.info("cluster defaults: %s", file)
    try:
        raw = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"cluster file {str(file)!r} is not valid TOML: {err}") from None
    cfg = ClusterCfg(path=str(file))
    for section, table in raw.items():
        if section == "env":
            if not isinstance(table, dict) or not all(isinstance(v, str | int | float) for v in table.values()):
                raise UserError(f"{file}: [env] must map names to strings")
            cfg.env = {k: str(v) for k, v in table.items()}
            continue
        target = getattr(cfg, section, None)
        if section == "path" or target is None or not isinstance(table, dict):
            raise UserError(f"{file}: unknown section [{section}]")
        _fill(target, table, f"{file}: {section}")
    for name in cfg.env:
        check_env_name(name)
    return cfg


def _fill(obj: Any, table: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(obj)}
    for key, value in table.items():
        if key not in known:
            raise UserError(f"{where}.{key}: unknown key (known: {', '.join(known)})")
        default = getattr(obj, key)
        ok = (isinstance(value, list) and all(isinstance(v, str) for v in value)) if isinstance(default, list) else \
            type(value) is type(default)
        if not ok:
            raise UserError(f"{where}.{key} = {value!r}: expected {type(default).__name__}")
        setattr(obj, key, value)


def check_env_name(name: str) -> str:
    """Returns ``name`` if it is a valid environment variable name.

    Raises:
        UserError: Otherwise.
    """
    if not _ENV_NAME.fullmatch(name):
        raise UserError(f"environment variable name {name!r} is not valid")
    return name


# ------------------------------------------------------------------------------------------- quoting
def sbatch_escape(value: str) -> str:
    """Writes a value for an ``#SBATCH`` line: as it is when plain, else double-quoted with escapes.

    In the quoted form backslashes and double quotes get a backslash; a backslash alone cannot protect
    whitespace, since Slurm's parser ends an argument at unquoted whitespace even after one.

    Raises:
        UserError: For a value with a line break (it cannot be written on one line).
    """
    if "\n" in value or "\r" in value:
        raise UserError(f"{value!r}: a line break cannot go into an #SBATCH option")
    if value and all(_SBATCH_PLAIN.fullmatch(c) for c in value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_line(option: str, value: str | int | None = None) -> str:
    """One ``#SBATCH --option[=value]`` line, the value escaped for Slurm's script parser."""
    if not re.fullmatch(r"[a-z][a-z-]*", option):
        raise UserError(f"{option!r} is not an sbatch option name")
    return f"#SBATCH --{option}" if value is None else f"#SBATCH --{option}={sbatch_escape(str(value))}"


def extra_sbatch_line(text: str) -> str:
    """An ``#SBATCH`` line from free text ``--name=value`` or ``--flag`` (``slurm.extra``, ``--sbatch``)."""
    name, sep, value = text.removeprefix("--").partition("=")
    return sbatch_line(name, value if sep else None)


def filename_pattern(path: Path) -> str:
    """A literal directory for Slurm's ``--output`` pattern: ``%`` doubled (``%j`` etc. are replaced)."""
    return str(path).replace("%", "%%")


def comment(text: str) -> str:
    """Text for a ``#`` comment line: line breaks (which would end the comment) become ``?``."""
    return re.sub(r"[\r\n]", "?", text)


def job_name(text: str) -> str:
    """A job name of plain characters (others become ``_``), at most 64 of them."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:64] or "vitpipe"


def shell_assign(name: str, value: str | int | list[str]) -> str:
    """``NAME=value`` for bash with the value quoted; a list becomes an array ``NAME=( ... )``."""
    check_env_name(name)
    if isinstance(value, list):
        return f"{name}=(" + "".join(f"\n  {shlex.quote(v)}" for v in value) + ("\n)" if value else ")")
    return f"{name}={shlex.quote(str(value))}"


def setup_block(cfg: ClusterCfg, extra_env: dict[str, str]) -> str:
    """The environment set-up: module loads, the cluster's ``setup`` lines, then the exports."""
    lines = [f"# environment set-up ({comment(cfg.path) or 'built-in defaults'})"]
    if cfg.environment.modules:
        lines += [f"module load {shlex.quote(m)}" for m in cfg.environment.modules]
    lines += cfg.environment.setup
    env = {**cfg.env, **extra_env}
    lines += [f"export {check_env_name(k)}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(lines)


def render(template: str | Path, sbatch: list[str], settings: dict[str, str | int | list[str]],
           setup: str, header: str = "") -> str:
    """Fills a template's placeholder lines.

    Args:
        template: The template file (``slurm/train.sbatch``...) or its name in ``slurm/``.
        sbatch: Complete ``#SBATCH`` lines (from :func:`sbatch_line`).
        settings: Variables for the script body; values are quoted here.
        setup: The environment set-up block (:func:`setup_block`).
        header: Comment lines placed after the ``#!`` line (how the script was made); values in them must
            have gone through :func:`comment`.

    Returns:
        The script text.
    """
    path = Path(template) if Path(template).is_file() else ROOT / "slurm" / str(template)
    blocks = {PLACEHOLDERS[0]: "\n".join(sbatch),
              PLACEHOLDERS[1]: "# settings\n" + "\n".join(shell_assign(k, v) for k, v in settings.items()),
              PLACEHOLDERS[2]: setup}
    out, seen = [], set()
    for i, line in enumerate(path.read_text().splitlines()):
        if line.startswith("#SBATCH"):
            continue  # the template's defaults for running it by hand; the rendered options replace them
        if line.strip() in blocks:
            seen.add(line.strip())
            out.append(blocks[line.strip()])
            continue
        out.append(line)
        if i == 0 and header:
            out.append(header)
    missing = set(PLACEHOLDERS) - seen
    if missing:
        raise UserError(f"template {path} lacks the line(s) {', '.join(sorted(missing))}")
    return "\n".join(out) + "\n"
