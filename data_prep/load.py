"""Read WildChat-1M or PRISM from the hub or from local parquet/jsonl, schema-checked, memory-mapped.

Everything goes through `datasets`, which converts the input once to memory-mapped Arrow files in
its cache: nothing is read whole into memory, and later runs reuse the conversion.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from data_prep import schemas
from data_prep.artifacts import sha256_of

log = logging.getLogger(__name__)
PARQUET_COLUMNS = {"wildchat": schemas.WILDCHAT_REQUIRED + schemas.WILDCHAT_OPTIONAL}
CHECKS = {"wildchat": schemas.check_wildchat, "prism": schemas.check_prism}


def local_files(source: str) -> list[Path] | None:
    """The parquet/jsonl files of a local file or folder (sorted), or None if `source` is a hub id."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        # A folder of shards: its parquet files if it has any, else its JSON Lines files.
        files = sorted(path.rglob("*.parquet")) or sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(f"{source}: no .parquet or .jsonl files in this folder")
        return files
    if source.startswith((".", "/")) or source.endswith((".parquet", ".jsonl", ".json")):
        raise FileNotFoundError(f"{source}: no such file or folder")
    return None


def load_source(data_cfg) -> tuple[datasets.Dataset, dict]:
    """Load the configured dataset; return it and its provenance (files and hashes, or hub sha)."""
    kind = data_cfg.kind
    if kind not in CHECKS:
        raise ValueError(f"data.kind={kind!r}: expected one of {sorted(CHECKS)}")
    check = CHECKS[kind]
    files = local_files(data_cfg.source)
    if files is not None:
        builder = "parquet" if files[0].suffix == ".parquet" else "json"
        kwargs = {}
        if builder == "parquet":
            for f in files:
                check(pq.read_schema(f), str(f))
            present = pq.read_schema(files[0]).names
            kwargs["columns"] = [c for c in PARQUET_COLUMNS.get(kind, present) if c in present]
        dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
        if builder == "json":
            check(dataset.data.schema, str(data_cfg.source))
        provenance = {"source": str(data_cfg.source),
                      "files": [{"path": str(f), "sha256": sha256_of(f)} for f in files]}
    else:
        kwargs = {"columns": list(PARQUET_COLUMNS[kind])} if kind in PARQUET_COLUMNS else {}
        dataset = datasets.load_dataset(data_cfg.source, data_cfg.hub_config, revision=data_cfg.revision,
                                        split="train", **kwargs)
        check(dataset.data.schema, data_cfg.source)
        provenance = {"source": data_cfg.source, "hub_config": data_cfg.hub_config,
                      "revision": data_cfg.revision, "resolved_sha": _hub_sha(data_cfg)}
    if data_cfg.limit is not None:
        dataset = dataset.select(range(min(data_cfg.limit, len(dataset))))
    provenance["rows"] = len(dataset)
    log.info("loaded %d rows from %s", len(dataset), data_cfg.source)
    return dataset, provenance


def _hub_sha(data_cfg) -> str:
    """The commit sha that `revision` resolves to on the hub, recorded for reproducibility."""
    from huggingface_hub import HfApi
    return HfApi().dataset_info(data_cfg.source, revision=data_cfg.revision).sha
