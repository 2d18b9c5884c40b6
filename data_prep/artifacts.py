"""Writing outputs reproducibly: atomic directories and files, manifests, fingerprints.

Every stage writes into a temporary sibling directory and renames it into place only when
complete (a COMPLETED marker is written last), so a killed run never leaves a half-written output
that looks finished. Manifests hold no wall-clock times, so the same config and input give the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def is_complete(directory: Path) -> bool:
    return (directory / COMPLETED).exists()


@contextmanager
def atomic_directory(directory: Path):
    """Yield a temporary directory that replaces `directory` once the block finishes without error."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(directory.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    (tmp / COMPLETED).write_text("")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
