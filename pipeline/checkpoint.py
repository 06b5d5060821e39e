"""Checkpoints: every rank takes part, content-hashed, written atomically, a ``latest`` pointer, keep-last-k.

Layout under the run directory::

    checkpoints/step_00000120/          # one directory per checkpoint
        model.safetensors, optimizer.bin | pytorch_model/   # whole weights + optimizer, or DeepSpeed's files
        scheduler.json, ema.safetensors, rng_state_<rank>.safetensors   # vitpipe's own state files
        trainer_state.json              # step, epoch, loader position, MLflow run id, size + sha256 of every
                                        # file, and its own sha256; written last
    checkpoints/latest                  # text: the name of the newest complete checkpoint
    final/model.safetensors             # fp32 weights; timm.create_model(name, checkpoint_path=...) loads them

Every rank writes its part into ``.step_N.tmp`` (accelerate's ``save_state`` for the weights and the
optimizer, :mod:`pipeline.state_files` for the rest), then hashes the files it wrote itself
(:func:`owner_rank`), right after writing them; rank 0 gathers the hashes, writes
``trainer_state.json``, renames the directory into place and moves ``latest``.

Resuming (:func:`choose_checkpoint`, every rank) takes the newest checkpoint whose files all have
their recorded size and SHA-256, each rank hashing its share, and all ranks agreeing on the outcome
before anything is loaded; a checkpoint that fails is skipped with a warning and the previous one is
tried. No file is unpickled: see :mod:`pipeline.state_files` for what is loaded how, and
:func:`pipeline.engine.weights_only_loads` for accelerate's and DeepSpeed's ``torch.load`` calls.

SHA-256 rather than BLAKE2b: with the SHA extensions of current x86 and ARM CPUs, OpenSSL's SHA-256
is about twice as fast as ``hashlib``'s BLAKE2b (1.56 vs 0.78 GB/s on the development machine), and
``sha256sum`` checks a file by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save

from data_prep.format import atomic_write_bytes
from pipeline.dist import broadcast_object
from pipeline.rundir import RunError
from pipeline.state_files import StateObjects, load_state_files, write_state_files

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
HASH = "sha256"
DERIVED = ("universal", "universal.sha256.json")
"""Entries of a checkpoint made from it later (DeepSpeed's universal format), not written with it."""
_RANK_IN_NAME = re.compile(r"(?:zero_pp_rank_|rng_state_|random_states_)(\d+)")
_SELF_HASH = "state_sha256"


class CheckpointError(RunError):
    """A run's checkpoints cannot be resumed: every one is corrupt, or loading the chosen one failed.

    Attributes:
        run_id: The MLflow run id the checkpoints name (None when none could be read).
    """

    def __init__(self, message: str, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


# ------------------------------------------------------------------ hashes
def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, HASH).hexdigest()


def owner_rank(name: str, world_size: int) -> int:
    """The rank that writes (and hashes) a checkpoint file: the rank in its name, else rank 0.

    DeepSpeed names its per-rank shards ``zero_pp_rank_<r>_...``; vitpipe's RNG states are
    ``rng_state_<r>``; everything else (weights, optimizer, scheduler, EMA, DeepSpeed's model states
    under ZeRO-0/1/2) is written by rank 0.
    """
    match = _RANK_IN_NAME.search(Path(name).name)
    rank = int(match.group(1)) if match else 0
    return rank if rank < world_size else 0


def _listing(folder: Path) -> list[str]:
    """The files of a checkpoint directory, relative and sorted; derived and hidden entries left out."""
    names = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not d.startswith(".") and (rel != Path(".") or d not in DERIVED)]
        names += [str(rel / f) if rel != Path(".") else f for f in files
                  if not f.startswith(".") and (rel != Path(".") or f not in DERIVED + (STATE_FILE,))]
    return sorted(names)


def hash_own_files(folder: Path, rank: int, world_size: int) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of the files of ``folder`` this rank wrote (:func:`owner_rank`)."""
    return {name: {"size": (folder / name).stat().st_size, HASH: file_digest(folder / name)}
            for name in _listing(folder) if owner_rank(name, world_size) == rank}


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its own SHA-256 (of its canonical JSON without that field) as ``state_sha256``."""
    return {**state, _SELF_HASH: _state_digest(state)}


def _state_digest(state: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in state.items() if k != _SELF_HASH}, sort_keys=True).encode()
    return hashlib.sha256(body).hexdigest()


def verify_files(folder: Path, files: dict[str, Any]) -> list[str]:
    """The problems of ``folder``'s files against their record: missing, another size, other content.

    Args:
        folder: A checkpoint directory.
        files: ``{name: {"size": n, "sha256": hex}}`` for the files to check.

    Returns:
        One ``"name: what"`` per bad file (empty when all match).
    """
    bad = []
    for name, rec in files.items():
        path = folder / name
        if not path.is_file():
            bad.append(f"{name}: missing")
        elif path.stat().st_size != rec["size"]:
            bad.append(f"{name}: {path.stat().st_size} bytes, {rec['size']} written")
        elif file_digest(path) != rec[HASH]:
            bad.append(f"{name}: content differs from its recorded {HASH} (same size)")
    return bad


def read_state(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A checkpoint's trainer state after the cheap checks (its own hash, the sizes, no stray files).

    Returns:
        ``(state, None)``, or ``(None, reason)`` when the checkpoint is incomplete or damaged.
    """
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as err:
        return None, f"incomplete: {err}"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict) or state.get("hash") != HASH:
        return None, f"written without content hashes (an older vitpipe); {STATE_FILE} has no {HASH}"
    if state.get(_SELF_HASH) != _state_digest(state):
        return None, f"{STATE_FILE}: content differs from its recorded {HASH}"
    sizes = {name: rec["size"] for name, rec in files.items()}
    present = _listing(path)
    bad = [f"{n}: not written with the checkpoint" for n in present if n not in sizes]
    bad += [f"{n}: missing" for n in sizes if not (path / n).is_file()]
    bad += [f"{n}: {(path / n).stat().st_size} bytes, {size} written" for n, size in sizes.items()
            if (path / n).is_file() and (path / n).stat().st_size != size]
    return (None, "; ".join(bad[:3])) if bad else (state, None)


def read_trainer_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint's trainer state if every file is intact (all hashed here), else None with a warning.

    For one process (``vitpipe export``); the trainer uses :func:`choose_checkpoint`.
    """
    state, reason = read_state(path)
    if state is not None:
        bad = verify_files(path, state["files"])
        reason = "; ".join(bad[:3]) if bad else None
    if reason:
        logger.warning("checkpoint %s is corrupt (%s)", path, reason)
        return None
    return state


# ------------------------------------------------------------ collectives
def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_to_main(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (a list by rank), ``[]`` elsewhere; every rank calls it."""
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


# ------------------------------------------------------------------- save
def save_checkpoint(acc: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], keep_last: int,
                    objects: StateObjects) -> Path:
    """Saves weights, optimizer, scheduler, EMA and RNG states plus ``trainer_state``; call on every rank.

    Args:
        acc: The accelerate ``Accelerator`` (its ``save_state`` writes weights and optimizer).
        ckpt_dir: The run's ``checkpoints`` directory (on a file system every rank sees).
        step: Optimizer step, used in the directory name.
        trainer_state: JSON-serialisable counters (step, epoch, loader position, run id).
        keep_last: How many step checkpoints to keep.
        objects: The scheduler and EMA saved in vitpipe's own files.

    Returns:
        The checkpoint's directory.
    """
    final, tmp = ckpt_dir / f"step_{step:08d}", ckpt_dir / f".step_{step:08d}.tmp"
    rank, world = _rank_world()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    write_state_files(tmp, acc, objects, rank)
    acc.wait_for_everyone()  # every file written: each rank hashes its own
    hashes = _gather_to_main(hash_own_files(tmp, rank, world))
    if acc.is_main_process:
        files = {name: rec for part in hashes for name, rec in part.items()}
        state = seal({**trainer_state, "hash": HASH, "files": dict(sorted(files.items()))})
        atomic_write_bytes(tmp / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_bytes(ckpt_dir / "latest", final.name.encode())
        for old in sorted(ckpt_dir.glob("step_*"))[:-keep_last]:
            shutil.rmtree(old)
        logger.info("saved checkpoint %s (%d files, %s recorded)", final, len(files), HASH)
    acc.wait_for_everyone()
    return final


# ---------------------------------------------------------------- resume
def _candidates(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, the ``latest`` one first, then the others newest first."""
    candidates = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
    pointer = ckpt_dir / "latest"
    if pointer.is_file() and (ckpt_dir / pointer.read_text().strip()).is_dir():
        latest = ckpt_dir / pointer.read_text().strip()
        candidates = [latest, *[c for c in candidates if c != latest]]
    return candidates


def _share(state: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """The files of a checkpoint this rank verifies: those its writer's rank maps to here."""
    written_by = int(state.get("world_size", 1))
    return {n: rec for n, rec in state["files"].items() if owner_rank(n, written_by) % world == rank}


def choose_checkpoint(ckpt_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest intact checkpoint of the run, the same on every rank; every rank calls it.

    Rank 0 lists the checkpoints and makes the cheap checks (:func:`read_state`); then, newest first,
    every rank hashes its share of the candidate's files (the ones its rank wrote, bounded work) and
    rank 0 decides from what all ranks found. Nothing is loaded here.

    Args:
        ckpt_dir: The run's ``checkpoints`` directory.

    Returns:
        ``(directory, trainer state)``, or None when the run has no checkpoint yet.

    Raises:
        CheckpointError: On every rank, when there are checkpoints but none is intact.
    """
    rank, world = _rank_world()
    listing = [(str(p), *read_state(p)) for p in _candidates(ckpt_dir)] if rank == 0 else None
    listing = broadcast_object(listing)
    reasons = []
    for path, state, reason in listing:
        if state is not None:
            found = _gather_to_main(verify_files(Path(path), _share(state, rank, world))[:3])
            bad = [b for part in found for b in part]
            reason = broadcast_object("; ".join(bad[:3]) if bad else None)
        if reason is None:
            return Path(path), state
        if rank == 0:
            logger.warning("checkpoint %s is corrupt (%s): trying the previous one", path, reason)
        reasons.append(f"{Path(path).name} ({reason})")
    if not listing:
        return None
    run_id = next((s.get("mlflow_run_id") for s in map(_any_state, listing) if s), None)
    raise CheckpointError(f"no checkpoint in {ckpt_dir} can be resumed: {'; '.join(reasons[:3])}; remove the "
                          "damaged ones to continue from an older one, or run with checkpoint.resume = false "
                          "and another run.name to start over", run_id=run_id)


def _any_state(entry: tuple[str, dict[str, Any] | None, str | None]) -> dict[str, Any] | None:
    """A candidate's trainer state as JSON, even from a damaged checkpoint (for its MLflow run id)."""
    if entry[1] is not None:
        return entry[1]
    try:
        state = json.loads((Path(entry[0]) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def load_checkpoint(acc: Any, path: Path, objects: StateObjects, run_id: str | None = None) -> None:
    """Loads a verified checkpoint into the live objects on this rank; every rank calls it.

    Weights and optimizer through accelerate's ``load_state`` (``safetensors`` and
    ``torch.load(weights_only=True)``; under DeepSpeed its own loader, which asks ``torch.load`` for
    ``weights_only=False``: the caller runs this under :func:`pipeline.engine.weights_only_loads`), then
    scheduler, EMA and this rank's RNG states from vitpipe's own files. The ranks then agree on the outcome.

    Args:
        acc: The accelerate ``Accelerator`` (model and optimizer prepared).
        path: The checkpoint directory chosen by :func:`choose_checkpoint`.
        objects: Scheduler and EMA to load into.
        run_id: The MLflow run the checkpoint belongs to (carried by the error).

    Raises:
        CheckpointError: On every rank, when loading failed on any rank (the first failure named).
    """
    rank, error = _rank_world()[0], None
    try:
        acc.load_state(str(path))
        load_state_files(path, acc, objects, rank)
    except Exception as err:  # noqa: BLE001 - every loader's failure becomes one line on every rank
        error = f"rank {rank}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        logger.debug("loading %s failed", path, exc_info=True)
    errors = [e for e in _gather_to_main(error) if e]
    error = broadcast_object(errors[0] if errors else None)
    if error:
        raise CheckpointError(f"resuming from {path} failed ({error}); remove that checkpoint "
                              "to continue from the previous one", run_id=run_id)


# ------------------------------------------------------------------ export
def export_weights(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """Writes fp32, contiguous weights as safetensors (atomically).

    Args:
        state_dict: Parameter and buffer tensors (any dtype and device).
        path: Output file; its folder is created.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))
    return path
