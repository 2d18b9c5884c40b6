"""Writing outputs safely and reproducibly: atomic files and directories, output ownership and
locks, manifests, fingerprints.

Files are written to a temporary sibling and renamed into place. A stage that writes a directory
holds `output_lock` on it for the whole run (one writer), and replaces or writes into it only if
it is empty or the stage's own earlier output (`STAGE_FILE` says which stage wrote it): a user's
files are never deleted or overwritten. Directories written at once (data_prep's output, train's
model/) are built in a temporary sibling and renamed into place when complete, with a COMPLETED
marker written last, so a killed run never leaves a half-written output that looks finished.
Manifests hold no wall-clock times, so the same config and input give the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import OmegaConf

COMPLETED = "COMPLETED"
PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "accelerate", "deepspeed",
            "hydra-core", "userlm-pipeline")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_config(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def config_hash(*parts) -> str:
    """A stable hash of JSON-serialisable parts (configs, fingerprints, format versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_hash(*modules) -> str:
    """A hash of the modules' source files."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def temporary_name(path: Path, tag: str) -> Path:
    """A sibling name unique to this process and call: two runs never share a temporary path, and a
    run removes only the temporaries it made."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside `path` (unique to this writer) that replaces `path` once the
    block finishes without error; a failed block leaves `path` as it was and no temporary."""
    path = Path(path)
    tmp = temporary_name(path, "tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write text atomically (temp file + rename)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETED).exists()


# ---- output directories: one writer, and only a stage's own output is ever replaced ----------------
# Every directory a stage writes carries STAGE_FILE, which names the stage, from the moment the stage
# creates it. A stage builds its directory either in place (train, simulate: `claim_directory`) or in a
# temporary sibling renamed into place when complete (data_prep, train's model/: `atomic_directory`).
# Both refuse a directory that holds anything the stage did not write. `output_lock` makes one run the
# only writer of a directory for as long as it runs.

STAGE_FILE = ".userlm-stage"


class OutputLocked(RuntimeError):
    """Another run holds the lock on an output directory."""


_held_locks: dict[Path, int] = {}  # resolved directory -> the lock file's descriptor, in this process


def lock_path(directory: Path) -> Path:
    directory = Path(directory).resolve()
    return directory.with_name(f".{directory.name}.lock")


@contextmanager
def output_lock(directory: Path, stage: str):
    """Hold the advisory lock on `directory` for the block: one writer per output directory.

    The lock is an flock on `<parent>/.<name>.lock` (it stays as an empty-looking file; the kernel
    drops the lock when the holder exits, even by kill -9). A second run fails at once with an
    error naming the holder. Nested use in one process is allowed. Shared filesystems without
    flock support (some NFS setups) do not lock.
    """
    directory = Path(directory).resolve()
    if directory in _held_locks:
        yield directory
        return
    path = lock_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's note stays readable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise OutputLocked(f"{directory} is being written by another run ({holder}); wait for it to finish "
                           f"or choose another output directory (lock: {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{stage}, pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held_locks[directory] = fd
    try:
        yield directory
    finally:
        del _held_locks[directory]
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock


def _require_lock(directory: Path) -> None:
    """A lock held on the directory or on one that contains it (train's lock covers its model/)."""
    resolved = Path(directory).resolve()
    if not any(resolved.is_relative_to(held) for held in _held_locks):
        raise RuntimeError(f"{directory}: writing an output directory needs artifacts.output_lock held on it")


def stage_of(directory: Path) -> str | None:
    """The stage that wrote `directory` (None when no stage of this project did)."""
    marker = Path(directory) / STAGE_FILE
    return marker.read_text(encoding="utf-8").strip() if marker.is_file() else None


def _is_empty(directory: Path) -> bool:
    return not directory.exists() or (directory.is_dir() and not any(directory.iterdir()))


def inputs_inside(directory: Path, inputs) -> list[str]:
    """Those of `inputs` (paths, or hub ids that are not local paths) that lie inside `directory`."""
    directory = Path(directory).resolve()
    return [str(p) for p in inputs if p is not None and Path(p).exists()
            and Path(p).resolve().is_relative_to(directory)]


def check_replaceable(directory: Path, stage: str, overwrite: bool = False, inputs=()) -> None:
    """Raise unless `directory` may be replaced by `stage`'s new output: it is absent or empty, or it
    is this stage's own complete earlier output, or `overwrite` is set. Never when it holds an input of
    this run. Stages call this at start, so a refusal comes before the work, not after it."""
    directory = Path(directory)
    held = inputs_inside(directory, inputs)
    if held:
        raise FileExistsError(f"{directory} holds inputs of this run ({', '.join(held)}): writing it would delete "
                              "them; choose another output directory")
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a directory: choose another output directory")
    if _is_empty(directory) or overwrite or (stage_of(directory) == stage and is_complete(directory)):
        return
    owner = stage_of(directory)
    what = f"an output of {owner}" if owner and owner != stage else \
        f"an incomplete output of {stage}" if owner else "files that no stage of this pipeline wrote"
    raise FileExistsError(f"{directory} is not empty and holds {what}: it is left as it is. Choose another "
                          "output directory (or set overwrite=true to replace it)")


@contextmanager
def atomic_directory(directory: Path, stage: str, *, overwrite: bool = False, inputs=()):
    """Yield a temporary directory that replaces `directory` once the block finishes without error.

    Only what `check_replaceable` allows is replaced. The temporary and the backup of the old
    output have names unique to this run; a failed block removes its own temporary. Needs
    `output_lock(directory)` held, so no other run can replace it between the check and the rename.
    """
    directory = Path(directory)
    _require_lock(directory)
    check_replaceable(directory, stage, overwrite, inputs)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(directory, "incomplete")
    tmp.mkdir()
    try:
        (tmp / STAGE_FILE).write_text(stage + "\n", encoding="utf-8")
        yield tmp
        (tmp / COMPLETED).write_text("")
        if directory.exists():
            backup = temporary_name(directory, "replaced")
            os.replace(directory, backup)
            os.replace(tmp, directory)
            shutil.rmtree(backup)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def claim_directory(directory: Path, stage: str) -> Path:
    """Make `directory` this stage's to build in place: create it (or take it when empty) and mark it,
    or accept it when the same stage marked it before (a resume). Anything else is refused, so a
    stage never writes among files it did not make. Needs `output_lock(directory)` held."""
    directory = Path(directory)
    _require_lock(directory)
    if stage_of(directory) != stage:
        if not _is_empty(directory):
            owner = stage_of(directory)
            what = f"an output of {owner}" if owner else "files that no stage of this pipeline wrote"
            raise FileExistsError(f"{directory} is not empty and holds {what}: it is left as it is. "
                                  "Choose another output directory")
        directory.mkdir(parents=True, exist_ok=True)
        write_text(directory / STAGE_FILE, stage + "\n")
    return directory


@contextmanager
def owned_directory(directory: Path, stage: str):
    """`output_lock` + `claim_directory`: for the block, `directory` is this run's to build in place."""
    with output_lock(directory, stage):
        yield claim_directory(directory, stage)
