"""``vitpipe submit``, ``vitpipe status``, ``vitpipe cancel`` and ``vitpipe prep ... --slurm``.

Each submission renders a template of ``slurm/`` (:mod:`vitpipe.slurm`) into the directory it works on
(the run directory, or a prep output directory) under ``slurm/``, submits it with ``sbatch``, and
appends the job to ``slurm/jobs.json`` there, which ``status`` and ``cancel`` read
(:func:`vitpipe.slurm_task.read_jobs`). Slurm writes the
job's output next to the script (``slurm/job-<id>.out``, appended across requeues).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vitpipe import slurm
from vitpipe.errors import UserError
from vitpipe.slurm_task import JOBS_FILE, mlflow_run_of, read_attempts, read_jobs, tag_mlflow_run

logger = logging.getLogger("vitpipe")

_RUN_KEYS = ("--run.name=", "--run.output_dir=", "run.name=", "run.output_dir=")


# ------------------------------------------------------------------------------ shared bits
def cluster_from_args(args: argparse.Namespace) -> slurm.ClusterCfg:
    """The cluster defaults with the command line's Slurm options applied over them."""
    cfg = slurm.load_cluster(getattr(args, "cluster", None))
    s = cfg.slurm
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(args, key, None) is not None:
            setattr(s, key, getattr(args, key))
    if getattr(args, "cpus_per_task", None) is not None:
        s.cpus_per_task = args.cpus_per_task
    if getattr(args, "exclusive", False):
        s.exclusive = True
    s.extra = [*s.extra, *(getattr(args, "sbatch", None) or [])]
    if getattr(args, "max_requeues", None) is not None:
        cfg.requeue.max_requeues = args.max_requeues
    if getattr(args, "signal_lead", None) is not None:
        cfg.requeue.signal_lead_s = args.signal_lead
    if getattr(args, "python", None):
        cfg.environment.python = args.python
    for item in getattr(args, "env", None) or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--env {item!r}: expected NAME=VALUE")
        cfg.env[slurm.check_env_name(name)] = value
    return cfg


def _common_sbatch(s: slurm.SlurmCfg, time: str) -> list[str]:
    lines = [slurm.sbatch_line(k, getattr(s, k)) for k in ("partition", "account", "qos", "constraint")
             if getattr(s, k)]
    lines.append(slurm.sbatch_line("time", time))
    return lines


def _header(template: str, cfg: slurm.ClusterCfg, script: Path, what: str, by: str = "vitpipe submit") -> str:
    return (f"# Rendered by `{by}` on {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC from slurm/{template}\n"
            f"# with the cluster defaults of {slurm.comment(cfg.path) or 'vitpipe (built-in)'}; {what}:\n"
            f"#   sbatch {slurm.comment(slurm.shlex.quote(str(script)))}")


def sbatch_submit(script: Path, *options: str, cwd: Path | None = None) -> str:
    """``sbatch --parsable [OPTIONS] SCRIPT``; returns the job id.

    Raises:
        UserError: When sbatch is missing or refuses the job (with its message).
    """
    cmd = ["sbatch", "--parsable", *options, str(script)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)
    except FileNotFoundError:
        raise UserError("sbatch not found: run this on a Slurm login node (or use --dry-run)") from None
    if proc.returncode != 0:
        raise UserError(f"sbatch refused {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def _record_job(folder: Path, **job: Any) -> None:
    jobs = read_jobs(folder) + [{**job, "submitted": datetime.now(UTC).isoformat(timespec="seconds")}]
    path = folder / "slurm" / JOBS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"jobs": jobs}, indent=1))
    os.replace(tmp, path)


def _write_script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


# ------------------------------------------------------------------------------------ training
def plan_training(args: argparse.Namespace) -> tuple[Path, Path, str, int]:
    """Resolves the run and renders its training script.

    Returns:
        (run directory, script path, script text, GPUs per node).
    """
    from pipeline.config_io import load_config
    from pipeline.rundir import check_run_dir, run_dir_of

    recipe = Path(args.target).resolve()
    if not recipe.is_file():
        raise UserError(f"recipe {args.target!r} not found")
    user_overrides = [o for o in args.overrides if not o.startswith(_RUN_KEYS)]
    job = load_config(recipe, args.overrides)  # fails here, once, rather than in every rank of the job
    run_dir = run_dir_of(job, recipe.stem)  # the name is fixed now: every attempt of the job uses it
    name, output_dir = run_dir.name, run_dir.parent
    overrides = [*user_overrides, f"--run.output_dir={json.dumps(str(output_dir))}", f"--run.name={json.dumps(name)}"]
    if load_config(recipe, overrides).run.name != name:  # the override must give back the very same name
        raise UserError(f"run.name = {name!r} does not survive the command line; choose another run.name")
    # A finished run is refused; an unfinished one may be submitted again (the trainer applies checkpoint.resume).
    check_run_dir(run_dir, resume=True)
    cfg = cluster_from_args(args)
    gpus = cfg.slurm.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if args.nodes < 1 or gpus < 0:
        raise UserError("--nodes must be >= 1 and --gpus-per-node >= 0")
    nproc = args.nproc_per_node or max(gpus, 1)
    s, script = cfg.slurm, run_dir / "slurm" / "train.sbatch"
    sbatch = [slurm.sbatch_line("job-name", slurm.job_name(f"vitpipe-{name}")),
              slurm.sbatch_line("nodes", args.nodes), slurm.sbatch_line("ntasks-per-node", 1)]
    if gpus:
        sbatch.append(slurm.sbatch_line("gpus-per-node", gpus))
    if s.cpus_per_task:
        sbatch.append(slurm.sbatch_line("cpus-per-task", s.cpus_per_task))
    if s.mem:
        sbatch.append(slurm.sbatch_line("mem", s.mem))
    if s.exclusive:
        sbatch.append(slurm.sbatch_line("exclusive"))
    sbatch += _common_sbatch(s, args.time or s.time)
    sbatch += [slurm.sbatch_line("signal", f"USR1@{cfg.requeue.signal_lead_s}"), slurm.sbatch_line("requeue"),
               slurm.sbatch_line("open-mode", "append"),
               slurm.sbatch_line("output", f"{slurm.filename_pattern(script.parent)}/job-%j.out")]
    sbatch += [slurm.extra_sbatch_line(x) for x in s.extra]
    settings: dict[str, Any] = {
        "WORKDIR": str(Path.cwd()), "RUN_DIR": str(run_dir), "JOB_SCRIPT": str(script), "RECIPE": str(recipe),
        "OVERRIDES": overrides, "NPROC_PER_NODE": nproc, "MAX_REQUEUES": cfg.requeue.max_requeues,
        "PYTHON": cfg.python}
    text = slurm.render("train.sbatch", sbatch, settings, slurm.setup_block(cfg, {}),
                        _header("train.sbatch", cfg, script, "submit it again (it resumes the run) with"))
    return run_dir, script, text, gpus


def submit_training(args: argparse.Namespace) -> int:
    """Renders and submits a training job (or prints the script with ``--dry-run``)."""
    run_dir, script, text, gpus = plan_training(args)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    _write_script(script, text)
    job_id = sbatch_submit(script, cwd=Path.cwd())
    _record_job(run_dir, job_id=job_id, kind="train", script=str(script), nodes=args.nodes,
                gpus_per_node=gpus)
    _tag_existing_run(run_dir)
    sys.stdout.write(f"submitted training job {job_id} ({args.nodes} node(s)) for {run_dir}\n"
                     f"  script  {script}\n  output  {script.parent / f'job-{job_id}.out'}\n"
                     f"  follow  vitpipe status {slurm.shlex.quote(str(run_dir))}\n")
    return 0


def _tag_existing_run(run_dir: Path) -> None:
    """A resubmitted run already has an MLflow run: record the new job id there now."""
    if mlflow_run_of(run_dir)[0] is None:
        return  # a new run: the trainer tags it with the job id when it creates it
    try:
        tag_mlflow_run(run_dir)
    except Exception as err:  # noqa: BLE001 - tracking never blocks a submission
        logger.warning("could not record the job in the run's MLflow run: %s", err)


# ---------------------------------------------------------------------------------- evaluation
def submit_evaluation(args: argparse.Namespace) -> int:
    """Renders and submits ``vitpipe eval RUN_DIR`` as a one-node job."""
    run_dir = Path(args.target).resolve()
    if not (run_dir / "config.toml").is_file():
        raise UserError(f"{args.target!r} is not a run directory (no config.toml); --eval takes one")
    cfg = cluster_from_args(args)
    s, script = cfg.slurm, run_dir / "slurm" / "eval.sbatch"
    sbatch = [slurm.sbatch_line("job-name", slurm.job_name(f"vitpipe-eval-{run_dir.name}")),
              slurm.sbatch_line("nodes", 1), slurm.sbatch_line("ntasks", 1),
              slurm.sbatch_line("cpus-per-task", args.cpus_per_task or cfg.eval.cpus_per_task)]
    gpus = cfg.slurm.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if gpus:
        sbatch.append(slurm.sbatch_line("gpus-per-node", 1))
    sbatch += _common_sbatch(s, args.time or cfg.eval.time)
    sbatch += [slurm.sbatch_line("output", f"{slurm.filename_pattern(script.parent)}/eval-%j.out")]
    sbatch += [slurm.extra_sbatch_line(x) for x in s.extra]
    eval_args = ([f"--split={args.split}"] if args.split else []) + \
        ([f"--weights={Path(args.weights).resolve()}"] if args.weights else []) + list(args.overrides)
    settings = {"WORKDIR": str(Path.cwd()), "RUN_DIR": str(run_dir), "EVAL_ARGS": eval_args, "PYTHON": cfg.python}
    text = slurm.render("eval.sbatch", sbatch, settings, slurm.setup_block(cfg, {}),
                        _header("eval.sbatch", cfg, script, "submit it again with"))
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    _write_script(script, text)
    job_id = sbatch_submit(script, cwd=Path.cwd())
    _record_job(run_dir, job_id=job_id, kind="eval", script=str(script))
    sys.stdout.write(f"submitted evaluation job {job_id} for {run_dir}\n"
                     f"  result  {run_dir / 'slurm' / f'eval-{job_id}.json'}\n")
    return 0


def run_submit_command(args: argparse.Namespace) -> int:
    """``vitpipe submit``: training from a recipe, or ``--eval RUN_DIR``."""
    if args.eval:
        return submit_evaluation(args)
    return submit_training(args)


# ------------------------------------------------------------------------------------ data prep
def submit_prep(args: argparse.Namespace, task_args: list[str], num_shards: int | None = None) -> int:
    """Renders and submits a prep job array (``task_args`` in every task) and its dependent merge job.

    The caller has written the plan (``OUT/_parts/plan.json``): the tasks read their slices of it.

    Args:
        args: The parsed ``vitpipe prep SOURCE ... --slurm`` arguments.
        task_args: The prep command for the tasks (``imagenet --src ... --out ...``), without the task
            index, task count, workers and Slurm options (the array template adds the first three).
        num_shards: Shards in the plan, when known: the array gets no more tasks than that.
    """
    cfg = cluster_from_args(args)
    p, out = cfg.prep, Path(args.out).resolve()
    tasks = args.slurm_tasks or p.tasks
    if num_shards is not None and 0 < num_shards < tasks:
        logger.info("%d array tasks for %d shards: submitting %d", tasks, num_shards, num_shards)
        tasks = num_shards
    throttle = p.throttle if args.slurm_throttle is None else args.slurm_throttle
    folder = out / "slurm"
    array_script, merge_script = folder / "prep_array.sbatch", folder / "prep_merge.sbatch"
    name = slurm.job_name(f"vitpipe-prep-{out.name}")
    common = {"VITPIPE_ROOT": str(slurm.ROOT), "PYTHON": cfg.python}
    array = [slurm.sbatch_line("job-name", name),
             slurm.sbatch_line("array", f"0-{tasks - 1}" + (f"%{throttle}" if throttle else "")),
             slurm.sbatch_line("nodes", 1), slurm.sbatch_line("ntasks", 1),
             slurm.sbatch_line("cpus-per-task", getattr(args, "cpus_per_task", None) or p.cpus_per_task)]
    if p.mem:
        array.append(slurm.sbatch_line("mem", cfg.slurm.mem or p.mem))
    array += _common_sbatch(cfg.slurm, args.time or p.time)
    array += [slurm.sbatch_line("requeue"), slurm.sbatch_line("open-mode", "append"),
              slurm.sbatch_line("output", f"{slurm.filename_pattern(folder)}/prep-%A_%a.out")]
    array += [slurm.extra_sbatch_line(x) for x in cfg.slurm.extra]
    merge = [slurm.sbatch_line("job-name", name + "-merge"), slurm.sbatch_line("nodes", 1),
             slurm.sbatch_line("ntasks", 1), slurm.sbatch_line("cpus-per-task", 4)]
    merge += _common_sbatch(cfg.slurm, p.merge_time)
    merge += [slurm.sbatch_line("output", f"{slurm.filename_pattern(folder)}/prep-merge-%j.out")]
    merge += [slurm.extra_sbatch_line(x) for x in cfg.slurm.extra]
    setup = slurm.setup_block(cfg, {})
    array_text = slurm.render("prep_array.sbatch", array, {**common, "PREP_NO_MERGE": "1", "PREP_ARGS": task_args},
                              setup, _header("prep_array.sbatch", cfg, array_script, "re-run failed tasks with "
                                             "--array=I,J and then the merge job; the array", "vitpipe prep --slurm"))
    merge_text = slurm.render("prep_merge.sbatch", merge, {**common, "MERGE_ARGS": [str(out)]}, setup,
                              _header("prep_merge.sbatch", cfg, merge_script, "after the array succeeded",
                                      "vitpipe prep --slurm"))
    if args.dry_run:
        sys.stdout.write(array_text + "\n" + merge_text)
        return 0
    _write_script(array_script, array_text)
    _write_script(merge_script, merge_text)
    array_id = sbatch_submit(array_script, cwd=slurm.ROOT)
    merge_id = sbatch_submit(merge_script, f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes",
                             cwd=slurm.ROOT)
    _record_job(out, job_id=array_id, kind="prep-array", script=str(array_script), tasks=tasks)
    _record_job(out, job_id=merge_id, kind="prep-merge", script=str(merge_script), after=array_id)
    sys.stdout.write(f"submitted prep array job {array_id} ({tasks} tasks) and merge job {merge_id} "
                     f"(after the array succeeds) for {out}\n  output  {folder}/prep-*.out\n"
                     f"  follow  vitpipe status {slurm.shlex.quote(str(out))}\n")
    return 0


# ------------------------------------------------------------------------------ status / cancel
def resolve_target(target: str, runs: str) -> Path:
    """A run (or prep output) directory from a path or a run name under ``runs``.

    Raises:
        UserError: When neither holds ``slurm/jobs.json``.
    """
    for candidate in (Path(target), Path(runs) / target):
        if (candidate / "slurm" / JOBS_FILE).is_file():
            return candidate.resolve()
    raise UserError(f"{target!r}: no jobs submitted there (no slurm/{JOBS_FILE} in it or in {runs}/{target})")


def job_states(job_id: str) -> list[dict[str, str]]:
    """Slurm's view of a job (one row per array task): ``scontrol show job``, else ``sacct``.

    Returns:
        Rows with JobId, JobState, Restarts, RunTime, NodeList, Reason, ExitCode (as far as known);
        ``[{"JobId": id, "JobState": "UNKNOWN"}]`` when Slurm no longer knows the job.
    """
    rows = []
    proc = _slurm_cmd(["scontrol", "-o", "show", "job", job_id])
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        kv = dict(re.findall(r"(\w+)=(\S*)", line))
        if "ArrayTaskId" in kv and "ArrayJobId" in kv:
            kv["JobId"] = f"{kv['ArrayJobId']}_{kv['ArrayTaskId']}"
        rows.append(kv)
    if rows:
        return rows
    proc = _slurm_cmd(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode,Elapsed,NodeList"])
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        jid, state, exit_code, elapsed, nodes = (line.split("|") + [""] * 5)[:5]
        rows.append({"JobId": jid, "JobState": state.split()[0] if state else "", "ExitCode": exit_code,
                     "RunTime": elapsed, "NodeList": nodes})
    return rows or [{"JobId": job_id, "JobState": "UNKNOWN"}]


def _slurm_cmd(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise UserError(f"{cmd[0]} not found: run this on a Slurm login node") from None


ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


def run_status_command(args: argparse.Namespace) -> int:
    """``vitpipe status TARGET``: the jobs of a run (or prep output) and where the run stands."""
    folder = resolve_target(args.target, args.runs)
    lines = [f"{folder}"]
    for job in read_jobs(folder):
        for row in job_states(str(job["job_id"])):
            extra = "  ".join(f"{k.lower()} {row[k]}" for k in ("Restarts", "RunTime", "NodeList", "Reason",
                                                                 "ExitCode") if row.get(k) not in (None, "", "None"))
            lines.append(f"  {job['kind']:<10} job {row['JobId']:<10} {row.get('JobState', '?'):<11} {extra}")
    summary = folder / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        lines.append(f"  run        {data.get('status')} at step {data.get('steps')}"
                     + (f", val top-1 {data['val_top1']:.4f}" if data.get("val_top1") is not None else ""))
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():
        lines.append(f"  checkpoint {latest.read_text().strip()}")
    attempts = read_attempts(folder)
    if attempts:
        lines.append(f"  attempts   {len(attempts)}: " + ", ".join(f"{a['job_id']}#{a['restart']} {a['outcome']}"
                                                              for a in attempts))
    if (folder / "config.toml").is_file():
        run_id, uri = mlflow_run_of(folder)
        if run_id:
            lines.append(f"  MLflow run {run_id} in {uri}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_cancel_command(args: argparse.Namespace) -> int:
    """``vitpipe cancel TARGET [--signal SIG]``: scancel the run's queued and running jobs."""
    folder = resolve_target(args.target, args.runs)
    ids = [str(j["job_id"]) for j in read_jobs(folder)
           if any(r.get("JobState") in ACTIVE for r in job_states(str(j["job_id"])))]
    if not ids:
        sys.stdout.write(f"no queued or running job for {folder}\n")
        return 0
    cmd = ["scancel", *([f"--signal={args.signal}"] if args.signal else []), *ids]
    proc = _slurm_cmd(cmd)
    if proc.returncode != 0:
        raise UserError(f"scancel failed: {proc.stderr.strip()}")
    what = f"sent {args.signal} to" if args.signal else "cancelled"
    sys.stdout.write(f"{what} job(s) {' '.join(ids)} of {folder}\n")
    return 0
