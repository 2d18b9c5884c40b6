"""Read a data source (data_prep.sources) from the hub or local files, checked, memory-mapped.

Everything goes through `datasets`, which converts the input once to memory-mapped Arrow files in
its cache: nothing is read whole into memory, and later runs reuse the conversion.

Local input is checked before `datasets` sees it, and every error names the file (and the line,
where there is one):
- a folder holds parquet shards or JSON Lines files (.jsonl, .json), never both (an error: one
  kind would otherwise go unread);
- a parquet file that cannot be read (0 bytes, truncated, corrupt) is an error; all shards must
  carry the same optional columns (a shard lacking one that another has is an error, since its
  rows cannot be filtered or split like the others);
- JSON Lines must be UTF-8 (a byte that is not is an error naming file and line) and each line
  one JSON object; a row may omit an optional key (read as null, as JSON has no schema);
- a file with no rows (a 0-row parquet shard, an empty JSON Lines file) is valid: it adds 0 rows
  and is listed under `empty_files` in the provenance. Input with no rows at all is an error;
- `data.limit` is a positive number of rows, or null for all.

Sources whose rows differ in shape (ShareGPT, OpenAI messages: reader "json_rows") are read from
local JSON Lines files or JSON files holding one list, each row kept as its JSON text and parsed
by the source's records function; each file's first row must hold the source's field (`conversations`, `messages`), so a
file of another format fails at once, naming the file.
"""

from __future__ import annotations

import codecs
import json
import logging
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from core.artifacts import sha256_of
from data_prep import sources

log = logging.getLogger(__name__)
JSON_ROW_FEATURES = datasets.Features({"json": datasets.Value("string")})
JSON_SUFFIXES = (".jsonl", ".json")
READ_CHUNK_BYTES = 16 * 2**20
# Rows decoded from parquet at a time (datasets' default is a whole row group: the hub's are up to
# 100 MB of WildChat text, held decoded while they are copied into the Arrow cache).
PARQUET_BATCH_ROWS = 1000


def local_files(source: str) -> list[Path] | None:
    """The parquet/jsonl files of a local file or folder (sorted), or None if `source` is a hub id."""
    path = Path(source)
    if path.is_file():
        return [path]
    if path.is_dir():
        parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
        jsonl = sorted(p for p in path.rglob("*") if p.suffix in JSON_SUFFIXES and p.is_file())
        if parquet and jsonl:
            raise ValueError(f"{source}: this folder holds both parquet ({len(parquet)} files, e.g. "
                             f"{parquet[0].name}) and JSON Lines ({len(jsonl)} files, e.g. {jsonl[0].name}) "
                             "shards: keep one kind per folder, or point data.source at one file")
        if not (parquet or jsonl):
            raise FileNotFoundError(f"{source}: no .parquet or .jsonl files in this folder")
        return parquet or jsonl
    if source.startswith((".", "/")) or source.endswith((".parquet", *JSON_SUFFIXES)):
        raise FileNotFoundError(f"{source}: no such file or folder")
    return None


def check_parquet_files(files: list[Path], wanted: list[str] | None, check) -> tuple[list[Path], list[str]]:
    """Check every parquet file's footer and schema; return the files with rows and the columns to read."""
    columns_of, rows_of = {}, {}
    for f in files:
        try:
            parquet = pq.ParquetFile(f)
            schema, rows_of[f] = parquet.schema_arrow, parquet.metadata.num_rows
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{f}: not a readable parquet file ({e})") from None
        check(schema, str(f))
        columns_of[f] = [c for c in (wanted or schema.names) if c in schema.names]
    first = files[0]
    for f in files[1:]:
        if set(columns_of[f]) != set(columns_of[first]):
            extra, lacking = set(columns_of[f]) - set(columns_of[first]), set(columns_of[first]) - set(columns_of[f])
            raise ValueError(f"{f}: every shard must carry the same columns, and this one"
                             + (f" lacks {sorted(lacking)} that {first} has" if lacking else "")
                             + (" and" if lacking and extra else "")
                             + (f" has {sorted(extra)} that {first} lacks" if extra else ""))
    return [f for f in files if rows_of[f] > 0], columns_of[first]


def check_utf8(path: Path) -> bool:
    """Raise a ValueError naming the file and line of the first byte sequence that is not UTF-8.
    Returns whether the file holds anything but whitespace."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, has_content = 1, False
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.object: the bytes of this call (an incomplete character carried over, then the chunk).
                bad_line = line + e.object[:e.start].count(b"\n")
                raise ValueError(f"{path}:{bad_line}: not UTF-8 text (byte {e.object[e.start]:#04x}: {e.reason}); "
                                 "convert the file to UTF-8") from None
            if not chunk:
                return has_content
            line += chunk.count(b"\n")
            has_content = has_content or bool(chunk.strip())


def first_json_error(path: Path) -> str | None:
    """"<file>:<line>: ..." for the first line of a JSON Lines file that is not JSON (a file that is
    one JSON document, a list, is parsed whole), or None."""
    with open(path, "rb") as f:
        if f.read(READ_CHUNK_BYTES).lstrip().startswith(b"["):
            f.seek(0)
            try:
                json.load(f)
            except ValueError as e:
                return f"{path}: not valid JSON ({e})"
            return None
        f.seek(0)
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as e:
                    return f"{path}:{number}: not valid JSON ({e})"
    return None


def first_unreadable_parquet(files: list[Path], columns: list[str]) -> str | None:
    """"<file>: ..." for the first parquet file whose data cannot be decoded, or None."""
    for f in files:
        try:
            for _ in pq.ParquetFile(f).iter_batches(columns=columns):
                pass
        except (pa.ArrowException, OSError) as e:
            return f"{f}: corrupt parquet data ({e})"
    return None


def load_local(files: list[Path], columns: list[str] | None, check, source: str) -> tuple[datasets.Dataset, list[Path]]:
    """Check, then load, local files; return the dataset and the files that held no rows."""
    kwargs = {}
    if files[0].suffix == ".parquet":
        builder = "parquet"
        with_rows, kwargs["columns"] = check_parquet_files(files, columns, check)
        kwargs["batch_size"] = PARQUET_BATCH_ROWS
    else:
        builder = "json"
        with_rows = [f for f in files if check_utf8(f)]
    empty = [f for f in files if f not in with_rows]
    for f in empty:
        log.warning("%s: no rows (a valid, empty file): nothing read from it", f)
    if not with_rows:
        raise ValueError(f"{source}: no rows to read" + (f" in any of its {len(files)} files" if len(files) > 1 else ""))
    try:
        dataset = datasets.load_dataset(builder, data_files=[str(f) for f in with_rows], split="train", **kwargs)
    except Exception as e:  # datasets names no file: find the one it could not read
        culprit = (first_unreadable_parquet(with_rows, kwargs["columns"]) if builder == "parquet"
                   else next(filter(None, map(first_json_error, with_rows)), None))
        raise ValueError(culprit or f"{source}: datasets could not read these files ({e.__cause__ or e})") from e
    if builder == "json":
        check(dataset.data.schema, source)
    return dataset, empty


def json_rows(files: list[str], digests: list[str], json_field: str):
    """Every row of the files as {json}, each parsed once here: a line that is not
    JSON, or a file whose first row lacks `json_field`, is an error naming the file (and line).
    `digests` only key datasets' cache."""
    for name in files:
        with open(name, "rb") as f:
            is_list = f.read(READ_CHUNK_BYTES).lstrip().startswith(b"[")
            f.seek(0)
            if is_list:
                try:
                    rows = ((position, row, None) for position, row in enumerate(json.load(f)))
                except ValueError as e:
                    raise ValueError(f"{name}: not valid JSON ({e})") from None
            else:
                rows = ((position, parsed_line(name, position, line), line) for position, line in enumerate(f, 1)
                        if line.strip())
            for number, (position, row, line) in enumerate(rows):
                if number == 0 and not (isinstance(row, dict) and json_field in row):
                    raise ValueError(f"{name}: its first row has no {json_field!r} field (keys: "
                                     f"{sorted(row) if isinstance(row, dict) else type(row).__name__}): is this "
                                     "the data.kind you meant?")
                text = line.decode().strip() if line is not None else json.dumps(row, ensure_ascii=False)
                yield {"json": text}


def parsed_line(name: str, number: int, line: bytes):
    try:
        return json.loads(line)
    except ValueError as e:
        raise ValueError(f"{name}:{number}: not valid JSON ({e})") from None


def load_json_rows(files: list[Path], digests: dict[Path, str], json_field: str, source: str
                   ) -> tuple[datasets.Dataset, list[Path]]:
    """Check, then read, JSON Lines / JSON list files row by row (JSON_ROW_FEATURES); `digests`: each
    file's sha256 (the cache key)."""
    if any(f.suffix not in JSON_SUFFIXES for f in files):
        raise ValueError(f"{source}: this source reads JSON Lines (.jsonl) or JSON (.json) files")
    with_rows = [f for f in files if check_utf8(f)]
    empty = [f for f in files if f not in with_rows]
    try:
        dataset = datasets.Dataset.from_generator(
            json_rows, features=JSON_ROW_FEATURES, gen_kwargs={
                "files": [str(f) for f in with_rows], "digests": [digests[f] for f in with_rows],
                "json_field": json_field}) if with_rows else None
    except datasets.exceptions.DatasetGenerationError as e:   # our ValueError, naming the file, inside
        raise (e.__cause__ if isinstance(e.__cause__, ValueError) else e) from None
    except ValueError as e:   # datasets' own: the files hold no rows (say, one JSON document "[]")
        raise ValueError(f"{source}: no rows to read ({e})") from None
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{source}: no rows to read")
    return dataset, empty


def read_columns(source, data_cfg) -> list[str] | None:
    """The table columns to read: the source's, and the id and user fields the config names."""
    if source.columns is None:
        return None
    extra = [c for c in (data_cfg.id_field, data_cfg.user_field) if c and c not in source.columns]
    return [*source.columns, *extra]


def load_source(data_cfg) -> tuple[datasets.Dataset, dict]:
    """Load the configured dataset; return it and its provenance (files and hashes, or hub sha)."""
    source = sources.get(data_cfg.kind)   # a DatasetKind: the schema refuses any other at composition
    if data_cfg.limit is not None and data_cfg.limit < 1:
        raise ValueError(f"data.limit={data_cfg.limit}: give a positive number of rows, or null to read all")
    if source.fixed_user_field is not None and data_cfg.user_field != source.fixed_user_field:
        raise ValueError(f"data.user_field={data_cfg.user_field}: {source.name}'s users are fixed by its schema "
                         f"({source.fixed_user_field}); leave data.user_field={source.fixed_user_field}")
    files = local_files(data_cfg.source)
    columns = read_columns(source, data_cfg)
    if files is not None:
        digests = {f: sha256_of(f) for f in files}
        if source.reader == "json_rows":
            dataset, empty = load_json_rows(files, digests, source.json_field, str(data_cfg.source))
        else:
            dataset, empty = load_local(files, columns, source.check, str(data_cfg.source))
        provenance = {"source": str(data_cfg.source),
                      "files": [{"path": str(f), "sha256": digests[f]} for f in files],
                      "empty_files": [str(f) for f in empty]}
    else:
        if source.reader == "json_rows":
            raise ValueError(f"data.source={data_cfg.source}: {source.name} is read from local files; download "
                             "the dataset's JSON or JSON Lines files and point data.source at them")
        kwargs = {"columns": columns} if columns is not None else {}
        dataset = datasets.load_dataset(data_cfg.source, data_cfg.hub_config, revision=data_cfg.revision,
                                        split="train", **kwargs)
        source.check(dataset.data.schema, data_cfg.source)
        provenance = {"source": data_cfg.source, "hub_config": data_cfg.hub_config,
                      "revision": data_cfg.revision, "resolved_sha": _hub_sha(data_cfg)}
    if source.reader == "table":
        for key, column in (("id_field", data_cfg.id_field), ("user_field", data_cfg.user_field)):
            if column and column != source.fixed_user_field and column not in dataset.column_names:
                raise ValueError(f"{data_cfg.source}: no column {column!r} (data.{key}) among {dataset.column_names}")
    if data_cfg.limit is not None:
        dataset = dataset.select(range(min(data_cfg.limit, len(dataset))))
    provenance["rows"] = len(dataset)
    log.info("loaded %d rows from %s", len(dataset), data_cfg.source)
    return dataset, provenance


def _hub_sha(data_cfg) -> str:
    """The commit sha that `revision` resolves to on the hub, recorded for reproducibility."""
    from huggingface_hub import HfApi
    return HfApi().dataset_info(data_cfg.source, revision=data_cfg.revision).sha


def records_of(batch: pa.Table, source_name: str, columns: list[str] | None, **kwargs) -> dict:
    """The normalise map (batched, over the loaded rows in Arrow format): the source's records of
    `batch`, given as Python columns (python_columns of the `columns` read; None: all)."""
    source = sources.get(source_name)
    return source.records(python_columns(batch, columns, source.nested_fields), **kwargs)


def python_columns(batch: pa.Table, columns: list[str] | None, nested_fields: dict[str, tuple[str, ...]]
                   ) -> dict[str, list]:
    """These columns of `batch` as Python lists, as datasets' Python format gives them, except that
    each list-of-structs column named in `nested_fields` holds only those of its struct fields."""
    return {name: _only_fields(column.combine_chunks(), nested_fields[name]).to_pylist()
            if name in nested_fields else column.to_pylist()
            for name, column in zip(batch.column_names, batch.columns) if columns is None or name in columns}


def _only_fields(lists: pa.Array, fields: tuple[str, ...]) -> pa.Array:
    """`lists` (a list of structs) with only these struct fields; any other array as it is."""
    if not (pa.types.is_list(lists.type) or pa.types.is_large_list(lists.type)) or \
            not pa.types.is_struct(lists.type.value_type):
        return lists
    structs = lists.values   # the whole child array: lists.offsets index into it
    kept = [f for f in fields if structs.type.get_field_index(f) >= 0]
    values = pa.StructArray.from_arrays([structs.field(f) for f in kept], names=kept,
                                        mask=structs.is_null() if structs.null_count else None)
    return type(lists).from_arrays(lists.offsets, values, mask=lists.is_null() if lists.null_count else None)
