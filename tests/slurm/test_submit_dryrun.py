"""``vitpipe submit --dry-run``, the rendered batch scripts run with stub Slurm commands, and the srun task wrapper.

No Slurm needed: the scripts are checked line by line, parsed the way sbatch parses ``#SBATCH`` lines, and
executed by bash with ``srun``/``scontrol`` stubs, which shows the requeue decision and that names with quotes,
spaces, ``$(...)`` and backticks stay text.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from vitpipe.cli import main
from vitpipe.errors import UserError
from vitpipe.slurm import load_cluster
from vitpipe.slurm_task import _children

RECIPE = "jobs/demo/vitnano_digits_cls_2xcpu.toml"


@pytest.fixture(autouse=True)
def _drop_log_handlers():
    """``main()`` points vitpipe's log handler at pytest's captured stderr: remove it when the test ends."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_vitpipe_handler", False)]:
        root.removeHandler(handler)


def _cluster_file(tmp_path: Path, **extra: str) -> Path:
    path = tmp_path / "cluster.toml"
    path.write_text(f"""
[slurm]
partition = "debug"
[requeue]
signal_lead_s = 90
max_requeues = 2
[environment]
python = {json.dumps(sys.executable)}
[env]
OMP_NUM_THREADS = "1"
{extra.get('more', '')}
""")
    return path


def _dry_run(capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(list(args)) == 0
    return capsys.readouterr().out


def _sbatch_value(line: str) -> str:
    """The option value of an ``#SBATCH --opt=value`` line as Slurm's ``_get_argument`` reads it (sbatch/opt.c)."""
    text, arg, quote, escape, i = line.removeprefix("#SBATCH").lstrip(), "", None, False, 0
    while i < len(text) and (quote or not text[i].isspace()):
        c, i = text[i], i + 1
        if escape:
            escape = False
        elif c == "\\":
            escape = True
            continue
        elif quote:
            if c == quote:
                quote = None
                continue
        elif c in "\"'":
            quote = c
            continue
        elif c == "#":
            break
        arg += c
    assert quote is None, line
    return arg.partition("=")[2]


def _sbatch_options(script: str) -> dict[str, str]:
    lines = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    return {ln.split()[1].split("=")[0].removeprefix("--"): _sbatch_value(ln) for ln in lines}


@pytest.mark.parametrize("nodes", [1, 2, 16])
def test_dry_run_renders_rendezvous_signal_and_requeue(capsys, tmp_path: Path, nodes: int) -> None:
    out = _dry_run(capsys, "submit", RECIPE, "--nodes", str(nodes), "--gpus-per-node", "8", "--time", "04:00:00",
                   "--cluster", str(_cluster_file(tmp_path)), f"--run.output_dir={tmp_path}", "--run.name=r1",
                   "--dry-run")
    opts = _sbatch_options(out)
    assert opts["nodes"] == str(nodes) and opts["ntasks-per-node"] == "1" and opts["gpus-per-node"] == "8"
    assert opts["signal"] == "USR1@90" and "requeue" in opts and opts["open-mode"] == "append"
    assert opts["time"] == "04:00:00" and opts["partition"] == "debug"
    assert opts["output"] == f"{tmp_path}/r1/slurm/job-%j.out"
    assert "NPROC_PER_NODE=8" in out and "MAX_REQUEUES=2" in out
    assert "MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000))" in out
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in out
    assert '--rdzv-backend=static --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" ' \
        '--node-rank=@SLURM_NODEID@' in out
    assert 'srun --nodes="$nodes" --ntasks-per-node=1' in out and "-m vitpipe.slurm_task run --" in out
    assert 'scontrol requeue "$SLURM_JOB_ID"' in out and "(( restarts < MAX_REQUEUES ))" in out
    assert "export OMP_NUM_THREADS=1" in out
    assert subprocess.run(["bash", "-n"], input=out, text=True).returncode == 0
    assert not (tmp_path / "r1").exists()  # a dry run writes nothing


def _stubs(tmp_path: Path) -> Path:
    """``srun`` and ``scontrol`` stubs: srun records its argv and plays the trainers (env STUB_*)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f"""#!/bin/bash
printf '%s\\n' "$@" > {tmp_path}/srun.args
printf '%s' "${{FOO-unset}}" > {tmp_path}/foo.env
if [[ -n $STUB_WAIT ]]; then  # until the batch shell passed a SIGUSR1 on with scancel
  touch {tmp_path}/srun.started
  for _ in $(seq 600); do [[ -f {tmp_path}/scancel.log ]] && break; sleep 0.1; done
fi
[[ -n $STUB_STATUS ]] && printf '{{"status": "%s"}}' "$STUB_STATUS" > "$STUB_RUN_DIR/summary.json"
[[ -n $STUB_LOG ]] && printf '%s\\n' "$STUB_LOG" >> "$STUB_RUN_DIR/log.rank1.txt"
exit "${{STUB_RC:-0}}"
""")
    (bin_dir / "scontrol").write_text(f"""#!/bin/bash
if [[ $1 == show && $2 == hostnames ]]; then printf 'node%03d\\n' $(seq 1 "$SLURM_JOB_NUM_NODES"); exit 0; fi
echo "$@" >> {tmp_path}/scontrol.log
""")
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scancel.log\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    return bin_dir


def _script_env(tmp_path: Path, run_dir: Path, nodes: int, restarts: int, cpus: str, stub: dict) -> dict:
    """Writes ``stub["script"]`` to job.sbatch; the environment of a job with the stubs first on PATH."""
    stub = dict(stub)
    (tmp_path / "job.sbatch").write_text(stub.pop("script"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{_stubs(tmp_path)}:{env['PATH']}", SLURM_JOB_ID="123457", SLURM_JOB_NUM_NODES=str(nodes),
               SLURM_JOB_NODELIST=f"node[001-{nodes:03d}]", SLURM_RESTART_COUNT=str(restarts),
               STUB_RUN_DIR=str(run_dir), **{f"STUB_{k.upper()}": v for k, v in stub.items()})
    if cpus:
        env["SLURM_CPUS_PER_TASK"] = cpus
    for log in ("scontrol.log", "scancel.log", "srun.started"):
        (tmp_path / log).unlink(missing_ok=True)
    return env


def _run_script(tmp_path: Path, script: str, run_dir: Path, nodes: int = 2, restarts: int = 0, cpus: str = "",
                **stub: str) -> subprocess.CompletedProcess:
    env = _script_env(tmp_path, run_dir, nodes, restarts, cpus, {**stub, "script": script})
    return subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)


def test_script_starts_torchrun_on_every_node_and_decides_on_requeue(capsys, tmp_path: Path) -> None:
    script = _dry_run(capsys, "submit", RECIPE, "--nodes", "16", "--gpus-per-node", "8", "--cluster",
                      str(_cluster_file(tmp_path)), f"--run.output_dir={tmp_path}", "--run.name=r16", "--dry-run")
    run_dir = tmp_path / "r16"

    done = _run_script(tmp_path, script, run_dir, nodes=16, cpus="12", status="FINISHED")
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[:4] == ["--nodes=16", "--ntasks-per-node=1", "--kill-on-bad-exit=0", "--cpus-per-task=12"]
    tail = args[args.index("vitpipe.launch") + 1:]
    assert tail[:8] == ["--nnodes=16", "--nproc-per-node=8", "--rdzv-backend=static", "--master-addr=node001",
                        "--master-port=23457", "--node-rank=@SLURM_NODEID@", "--max-restarts=0", "-m"]
    assert tail[8:10] == ["pipeline.train", str(ROOT / RECIPE)]
    assert "ended: FINISHED" in done.stdout and not (tmp_path / "scontrol.log").exists()

    # torchrun turns the trainers' 75 into 1: summary.json of this attempt decides.
    preempted = _run_script(tmp_path, script, run_dir, status="PREEMPTED", rc="1")
    assert preempted.returncode == 0, preempted.stderr
    assert (tmp_path / "scontrol.log").read_text() == "requeue 123457\n"
    # An older summary does not count; a rank log line of this attempt does (rank 0 died before writing one).
    old = json.dumps({"status": "PREEMPTED"})
    (run_dir / "summary.json").write_text(old)
    os.utime(run_dir / "summary.json", (time.time() - 3600, time.time() - 3600))
    crashed = _run_script(tmp_path, script, run_dir, rc="1")
    assert crashed.returncode == 1 and "ended: FAILED" in crashed.stdout
    assert not (tmp_path / "scontrol.log").exists()
    log_only = _run_script(tmp_path, script, run_dir, rc="1",
                           log="preempted at step 7: checkpoint written, exiting with status 75 for a requeue")
    assert log_only.returncode == 0 and (tmp_path / "scontrol.log").read_text() == "requeue 123457\n"
    # The bound: at SLURM_RESTART_COUNT == max_requeues the job stops with 75 instead.
    limit = _run_script(tmp_path, script, run_dir, restarts=2, status="PREEMPTED", rc="1")
    assert limit.returncode == 75 and "requeue limit reached (2)" in limit.stderr
    assert not (tmp_path / "scontrol.log").exists()
    outcomes = [json.loads(line)["outcome"] for line in (run_dir / "slurm" / "attempts.jsonl").read_text().splitlines()]
    assert outcomes == ["FINISHED", "PREEMPTED", "FAILED", "PREEMPTED", "PREEMPTED"]


def test_usr1_to_the_batch_shell_is_passed_on_to_the_steps(capsys, tmp_path: Path) -> None:
    """--signal=B:USR1@lead or scancel --batch: the batch shell survives and signals the steps (scancel)."""
    script = _dry_run(capsys, "submit", RECIPE, "--nodes", "2", "--cluster", str(_cluster_file(tmp_path)),
                      f"--run.output_dir={tmp_path}", "--run.name=b", "--dry-run")
    env = _script_env(tmp_path, tmp_path / "b", 2, 0, "", {"script": script, "wait": "1", "status": "PREEMPTED",
                                                           "rc": "1"})
    proc = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "scancel.log").read_text() == "--signal=USR1 123457\n"
    assert "passing it on to the job steps" in out and "ended: PREEMPTED (srun status 1)" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 123457\n"


def test_names_with_quotes_spaces_and_substitutions_stay_text(capsys, tmp_path: Path) -> None:
    runs = tmp_path / "my runs"
    name = """it's "quoted" $(touch pwned1) `touch pwned2` #x"""  # no "/": a run name is one directory name
    experiment = f"exp $(touch {tmp_path}/pwned3);echo `touch {tmp_path}/pwned4`"
    env_value = f"$(touch {tmp_path}/pwned5)'\""
    cluster = _cluster_file(tmp_path, more=f'EXTRA = {json.dumps(env_value)}')
    script = _dry_run(capsys, "submit", RECIPE, "--nodes", "2", "--cluster", str(cluster), f"--run.output_dir={runs}",
                      f"--run.name={name}", f"--tracking.experiment={experiment}", "--env", f"FOO={env_value}",
                      "--partition", "p q'x", "--dry-run")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    opts = _sbatch_options(script)
    assert opts["output"] == f"{runs}/{name}/slurm/job-%j.out" and opts["partition"] == "p q'x"
    assert opts["job-name"].startswith("vitpipe-it_s") and set(opts["job-name"]) <= set(
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+-")

    proc = _run_script(tmp_path, script, runs / name, status="FINISHED")
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("pwned*")) and not list(ROOT.glob("pwned*"))  # the script's cwd and WORKDIR
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert f"--tracking.experiment={experiment}" in args
    assert f"--run.name={json.dumps(name)}" in args  # TOML string: the trainer reads the name back exactly
    assert (tmp_path / "foo.env").read_text() == env_value
    assert (runs / name / "slurm" / "attempt.json").is_file()  # the batch script found the run directory

    from pipeline.config_io import load_config

    cfg = load_config(ROOT / RECIPE, [a for a in args if a.startswith("--run.") or a.startswith("--tracking.")])
    assert (cfg.run.name, cfg.tracking.experiment, cfg.run.output_dir) == (name, experiment, str(runs))


def test_eval_and_prep_dry_runs(capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text("")
    cluster = str(_cluster_file(tmp_path))
    out = _dry_run(capsys, "submit", "--eval", str(run_dir), "--split", "val", "--cluster", cluster, "--dry-run")
    opts = _sbatch_options(out)
    assert opts["nodes"] == "1" and opts["ntasks"] == "1" and opts["output"] == f"{run_dir}/slurm/eval-%j.out"
    assert "EVAL_ARGS=(\n  --split=val\n)" in out and '-m vitpipe eval "$RUN_DIR"' in out

    src, dest = tmp_path / "src dir", tmp_path / "out's"
    out = _dry_run(capsys, "prep", "imagenet", "--src", str(src), "--out", str(dest), "--shard-size", "4", "--slurm",
                   "--slurm-tasks", "3", "--slurm-throttle", "2", "--cluster", cluster, "--dry-run")
    array, merge = out.split("#!/bin/bash")[1:]
    assert _sbatch_options(array)["array"] == "0-2%2" and _sbatch_options(array)["output"] == \
        f"{dest}/slurm/prep-%A_%a.out"
    settings = array.split("# settings")[1].split("set -euo pipefail")[0]
    shown = subprocess.run(["bash", "-c", settings + '\nprintf "%s\\n" "${PREP_ARGS[@]}"'], capture_output=True,
                           text=True).stdout.splitlines()
    assert shown[:3] == ["imagenet", "--out", str(dest)] and shown[shown.index("--src") + 1] == str(src)
    assert "--slurm" not in shown and "--task-index" not in shown and "PREP_NO_MERGE=1" in array
    assert "MERGE_ARGS=(" in merge and "#SBATCH --dependency" not in merge  # the dependency is added at submission

    # The tasks' command parses back to the same arguments (append, nargs and flags included), paths absolute.
    out = _dry_run(capsys, "prep", "videolist", "--list", "train=a b.txt", "--list", "val=v.txt", "--root", "r",
                   "--codec", "vp9", "--fps", "15", "--out", str(dest), "--slurm", "--cluster", cluster, "--dry-run")
    settings = out.split("# settings")[1].split("set -euo pipefail")[0]
    argv = subprocess.run(["bash", "-c", settings + '\nprintf "%s\\n" "${PREP_ARGS[@]}"'], capture_output=True,
                          text=True).stdout.splitlines()
    from vitpipe.cli import build_parser

    args = build_parser().parse_args(["prep", *argv])
    assert args.list == [("train", Path("a b.txt").resolve()), ("val", Path("v.txt").resolve())]
    assert (args.root, args.codec, args.fps, args.out, args.slurm) == (Path("r").resolve(), "vp9", 15.0, dest, False)


def test_prep_submission_plans_once_and_tasks_read_the_plan(capsys, monkeypatch, tmp_path: Path) -> None:
    """``prep --slurm`` scans and writes the plan before submitting (no more tasks than shards); a task started
    with the rendered arguments uses that plan without scanning (sbatch is a stub here)."""
    from tests.data_prep.test_images_scale import make_imagenet

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/sbatch.args\necho 4242\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    src, dest = make_imagenet(tmp_path / "src", bad=False), tmp_path / "out"
    out = _dry_run(capsys, "prep", "imagenet", "--src", str(src), "--out", str(dest), "--shard-size", "4", "--slurm",
                   "--slurm-tasks", "50", "--cluster", str(_cluster_file(tmp_path)))
    assert "submitted prep array job 4242 (7 tasks)" in out  # 5 train + 2 val shards
    assert (dest / "_parts" / "plan.json").is_file() and (dest / "_parts" / "plan.parquet").is_file()
    array = (dest / "slurm" / "prep_array.sbatch").read_text()
    assert _sbatch_options(array)["array"].startswith("0-6")
    settings = array.split("# settings")[1].split("set -euo pipefail")[0]
    task_args = subprocess.run(["bash", "-c", settings + '\nprintf "%s\\n" "${PREP_ARGS[@]}"'], capture_output=True,
                               text=True).stdout.splitlines()
    res = subprocess.run([sys.executable, "-m", "vitpipe", "prep", *task_args, "--task-index", "6", "--num-tasks", "7",
                          "--workers", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "task 6/7: shards 6..6 of 7" in res.stderr and "planning" not in res.stderr
    assert "class folders" not in res.stderr  # no scan
    assert (dest / "val" / "val-000001.tar").is_file()


def test_submission_writes_the_script_and_tags_an_existing_mlflow_run(capsys, monkeypatch, tmp_path: Path) -> None:
    """Resubmitting a preempted run: the script lands in the run directory, the job in jobs.json and the run's
    MLflow run (sbatch is a stub here)."""
    from mlflow.tracking import MlflowClient

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/sbatch.args\necho "4711;localcluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    runs = tmp_path / "runs"
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    runs.mkdir()
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    (runs / "r").mkdir()
    (runs / "r" / "summary.json").write_text(json.dumps({"status": "PREEMPTED", "mlflow_run_id": run_id,
                                                         "tracking_uri": uri}))
    out = _dry_run(capsys, "submit", RECIPE, "--nodes", "2", "--cluster", str(_cluster_file(tmp_path)),
                   f"--run.output_dir={runs}", "--run.name=r")
    script = runs / "r" / "slurm" / "train.sbatch"
    assert "submitted training job 4711 (2 node(s))" in out and os.access(script, os.X_OK)
    assert (tmp_path / "sbatch.args").read_text().split() == ["--parsable", str(script)]
    assert [j["job_id"] for j in json.loads((runs / "r" / "slurm" / "jobs.json").read_text())["jobs"]] == ["4711"]
    assert client.get_run(run_id).data.tags["vitpipe.slurm_job_id"] == "4711"


def test_status_and_cancel_need_submitted_jobs(capsys, tmp_path: Path) -> None:
    for command in ("submit", "status", "cancel"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    assert main(["status", str(tmp_path)]) == 2 and main(["cancel", "nope", "--runs", str(tmp_path)]) == 2
    assert "no jobs submitted there" in capsys.readouterr().err


def test_cluster_file_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[slurm]\npartitoin = 'x'\n")
    with pytest.raises(UserError, match="partitoin: unknown key"):
        load_cluster(bad)
    bad.write_text("[requeue]\nmax_requeues = 'many'\n")
    with pytest.raises(UserError, match="expected int"):
        load_cluster(bad)
    bad.write_text("[env]\n'A-B' = '1'\n")
    with pytest.raises(UserError, match="not valid"):
        load_cluster(bad)
    assert load_cluster(ROOT / "slurm" / "cluster.toml").requeue.max_requeues == 3


def test_task_wrapper_fills_the_node_rank_of_the_launcher_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitpipe.slurm_task import fill_node_rank

    monkeypatch.setenv("SLURM_NODEID", "3")
    cmd = ["py", "-m", "vitpipe.launch", "--node-rank=@SLURM_NODEID@", "-m", "pipeline.train", "r.toml",
           "--run.name=@SLURM_NODEID@"]
    assert fill_node_rank(cmd) == [*cmd[:3], "--node-rank=3", *cmd[4:]]


def test_cluster_file_of_the_working_copy_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("VITPIPE_CLUSTER", raising=False)
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="vitpipe")
    assert load_cluster().path == str(ROOT / "slurm" / "cluster.toml")  # no ./slurm/cluster.toml: the package's
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / "cluster.toml").write_text("[slurm]\npartition = 'mine'\n")
    cfg = load_cluster()
    assert cfg.slurm.partition == "mine" and cfg.path == str(tmp_path / "slurm" / "cluster.toml")
    assert f"cluster defaults: {tmp_path / 'slurm' / 'cluster.toml'}" in caplog.text
    other = _cluster_file(tmp_path)  # --cluster FILE wins over both
    assert load_cluster(other).slurm.partition == "debug" and f"cluster defaults: {other}" in caplog.text


WORKER = """\
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
open(os.path.join(sys.argv[1], "ready" + os.environ["RANK"]), "w").close()
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # a second (forwarded twice) signal would arrive now
open(os.path.join(sys.argv[1], "got" + os.environ["RANK"]), "w").write(str(len(got)))
sys.exit(75 if got else 0)
"""


def _start(cmd: list[str], tmp_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.1)
    return proc


def test_task_wrapper_keeps_torchrun_alive_and_forwards_usr1(tmp_path: Path) -> None:
    """torchrun's agent dies of SIGUSR1; under the wrapper it survives and each trainer gets the signal once."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(worker),
                str(tmp_path)]
    bare = _start(torchrun, tmp_path)
    trainers = _children(bare.pid)
    bare.send_signal(signal.SIGUSR1)
    assert bare.wait(timeout=60) == -signal.SIGUSR1  # the pitfall: the agent itself is killed
    time.sleep(1)
    for pid in trainers:  # its orphaned trainers never heard of it; they would be killed with the step
        assert Path(f"/proc/{pid}").exists() and not list(tmp_path.glob("got*"))
        os.kill(pid, signal.SIGKILL)
    for rank in (0, 1):
        (tmp_path / f"ready{rank}").unlink()

    wrapped = _start([sys.executable, "-m", "vitpipe.slurm_task", "run", "--", *torchrun], tmp_path)
    wrapped.send_signal(signal.SIGUSR1)  # from this test process, not slurmstepd: the wrapper forwards it
    assert wrapped.wait(timeout=60) == 1  # torchrun reports the trainers' 75 as its own failure
    assert [(tmp_path / f"got{r}").read_text() for r in (0, 1)] == ["1", "1"]
    assert "forwarding it to the trainers" in wrapped.stderr.read()
