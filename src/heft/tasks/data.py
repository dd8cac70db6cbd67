"""Reading a task's rows from a local folder/file or the Hugging Face hub, with strict validation.

Every problem is reported as a `DataError` naming the file, the row (or line) and the field, and
everything is checked before anything is returned, so a run never trains on a half-read file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from heft.config import DataConfig

EXTENSIONS = ("parquet", "jsonl", "json", "csv")
"""Local file formats, in the order they are listed in messages."""

T = TypeVar("T")


class DataError(ValueError):
    """Bad or unreachable data; the message says which file, row and field, and what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        """What to change for this cause; None: where the data comes from (the CLI's default hint)."""


class FieldError(ValueError):
    """Raised by a row parser for one bad value; `parse_rows` adds the file and row to it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class MissingColumn(DataError):
    """A file lacks the column of a field; `named_by` is the config key (a template) that asks for it.
    Tasks that accept several row shapes (completion rows) try the next shape on this error only."""

    def __init__(
        self, file: str, where: str, field: str, column: str, present: list[str], named_by: str | None = None
    ) -> None:
        mapped = "" if column == field else f" (mapped by data.columns to column {column!r})"
        asked = f", which {named_by} names" if named_by else ""
        super().__init__(
            f"{file}: {where}: missing column {column!r} for field {field!r}{mapped}{asked}; found columns {present}",
            hint=(f"fix {named_by}, or if" if named_by else "if")
            + f" the file names it otherwise, map it with data.columns.{field}=<column>",
        )
        self.field = field
        self.details = (file, where, field, column, present)


@dataclass(frozen=True)
class Row:
    """One data row, keyed by the task's field names, and where it came from (for messages)."""

    file: str
    """Path of the file, or `<hub id> [<split>]` for hub data."""
    where: str
    """Position inside the file: `row 3` (1-based data row), `line 5` (JSONL) or both (CSV)."""
    values: dict[str, Any]


def hub_name(dataset: str, subset: str | None) -> str:
    """How messages and run records name a hub dataset: `id`, or `id (subset)` with a configuration."""
    return dataset if subset is None else f"{dataset} ({subset})"


def source_label(source: str, subset: str | None = None) -> str:
    """A source as run records name it: the absolute path of local data, else `hub:<id> (<subset>)`."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else f"hub:{hub_name(source, subset)}"


@dataclass(frozen=True)
class HubDefault:
    """Where a preset's data is on the hub when its local default folder is absent: the dataset, its
    configuration, and the columns that hold the task's fields there (`data.columns` entries)."""

    dataset: str
    subset: str | None = None
    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)


def resolve_source(
    task_name: str, data_cfg: DataConfig, default_source: str | None, default_eval_split: str = "validation"
) -> str:
    """Pick the data source: `data.source`, else `$HEFT_DATA_DIR/<task>`, else `$HEFT_DATA_DIR`
    when it directly holds a train or eval split file (`default_eval_split` when `data.eval_split`
    is unset), else the task's default source; a task without one (a kind such as multiple_choice)
    needs one of the others."""
    if data_cfg.source:
        return data_cfg.source
    env = os.environ.get("HEFT_DATA_DIR")
    if env:
        root = Path(env).expanduser()
        if (root / task_name).is_dir():
            return str(root / task_name)
        if root.is_dir() and any(
            _split_candidates(root, split)
            for split in (data_cfg.train_split, data_cfg.eval_split or default_eval_split)
        ):
            return str(root)
    if default_source is None:
        env_note = f"HEFT_DATA_DIR={env!r} holds no {task_name}/ folder" if env else "HEFT_DATA_DIR is unset"
        raise DataError(
            f"task {task_name!r} has no default data and data.source is unset ({env_note})",
            hint="set data.source to a folder of <split>.jsonl|.json|.csv|.parquet files, or to one file",
        )
    return default_source


def pick_eval_split(source: str, preferred: Sequence[str], train_split: str) -> str:
    """The first of `preferred` that a local folder holds, else `train_split` (evaluation then holds
    examples out of it); a single file or a hub dataset takes `preferred[0]`. A folder with none of
    them is an error that lists its files and the key to set."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return preferred[0]
    for split in (*dict.fromkeys(preferred), train_split):
        if any(_split_candidates(base, split) for base in (folder, folder / "data")):
            return split
    listing = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"{folder}: no file for an evaluation split ({', '.join(dict.fromkeys(preferred))}) nor for the training "
        f"split {train_split!r}; the folder has {listing}",
        hint="name the files' splits: data.train_split=<file stem> and data.eval_split=<file stem>",
    )


def read_rows(
    source: str,
    split: str,
    fields: Sequence[str],
    columns: Mapping[str, str] | None = None,
    named_by: Mapping[str, str] | None = None,
    subset: str | None = None,
) -> list[Row]:
    """Read every row of `split` from `source`, keeping only the task's `fields`.

    `source` is a folder holding `<split>.<ext>` (or hub-style shards `<split>-00000-of-00002.<ext>`,
    also inside a `data/` subfolder), a single file (used for *every* split: point train and eval
    at different files or folders yourself), or a hub dataset id (its configuration `subset`). `columns`
    maps task fields to the file's column names; `named_by` the config key (a template) that asks for a
    field, for the message when a column is missing. Raises `DataError` on missing columns, empty files
    and undecodable text.
    """
    columns = dict(columns or {})
    unknown = sorted(set(columns) - set(fields))
    if unknown:
        raise DataError(
            f"data.columns maps unknown field(s) {unknown}; the task's fields are {list(fields)}",
            hint="data.columns maps the task's field names (keys) to the file's column names (values)",
        )
    try:
        return _read_split(source, split, {f: columns.get(f, f) for f in fields}, subset)
    except MissingColumn as e:
        if e.field not in (named_by or {}):
            raise
        raise MissingColumn(*e.details, named_by=named_by[e.field]) from None


def _read_split(source: str, split: str, wanted: dict[str, str], subset: str | None) -> list[Row]:
    path = Path(source).expanduser()
    if subset is not None and path.exists():
        raise DataError(
            f"data.subset {subset!r} names a configuration of a hub dataset, but {source} is local data",
            hint="remove data.subset, or set data.source to the hub dataset's id",
        )
    if path.is_dir():
        files = _split_files(path, split)
    elif path.is_file():
        files = [path]
    elif path.is_absolute() or source.startswith((".", "~")) or path.suffix.lstrip(".") in EXTENSIONS:
        raise DataError(f"data source {source!r} does not exist")
    else:
        return _read_hub(source, split, wanted, subset)
    return [row for file in files for row in _read_file(file, wanted)]


def parse_rows(rows: Sequence[Row], parse: Callable[[dict[str, Any]], T]) -> list[T]:
    """Apply `parse` to every row, turning its `FieldError`s into `DataError`s that say where."""
    out = []
    for row in rows:
        try:
            out.append(parse(row.values))
        except FieldError as e:
            raise DataError(
                f"{row.file}: {row.where}: field {e.field!r}: {e}", hint=f"fix or remove {row.where} of {row.file}"
            ) from None
    return out


def subsample(items: Sequence[T], n: int, seed: int, label: Callable[[T], Any] | None = None) -> list[T]:
    """Stratified sample of `n` items with a fixed seed, so small runs keep the label balance.

    Per-label quotas follow the split's proportions (largest remainder, so each is within one
    item of exact). The result keeps the original order; with `n >= len(items)` it is all items.
    `label` reads an item's label (default: its `.label` attribute).
    """
    if n < 0:
        raise ValueError(f"cannot subsample a negative number of examples ({n})")
    if n >= len(items):
        return list(items)
    get = label or (lambda item: item.label)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        groups[get(item)].append(i)
    keys = sorted(groups, key=repr)
    exact = {k: n * len(groups[k]) / len(items) for k in keys}
    quota = {k: int(exact[k]) for k in keys}
    by_remainder = sorted(keys, key=lambda k: exact[k] - quota[k], reverse=True)
    for k in by_remainder[: n - sum(quota.values())]:
        quota[k] += 1
    rng = random.Random(seed)
    chosen = sorted(i for k in keys for i in rng.sample(groups[k], quota[k]))
    return [items[i] for i in chosen]


def _split_candidates(folder: Path, split: str) -> list[Path]:
    """Files that could hold `split` directly inside `folder`."""
    found = []
    for ext in EXTENSIONS:
        single = folder / f"{split}.{ext}"
        if single.is_file():
            found.append(single)
        found.extend(sorted(folder.glob(f"{split}-[0-9]*-of-[0-9]*.{ext}")))
    return found


def _split_files(folder: Path, split: str) -> list[Path]:
    """The file(s) of one split in a local folder: one file, or the shards of one format."""
    for base in (folder, folder / "data"):
        found = _split_candidates(base, split)
        if not found:
            continue
        single = [p for p in found if p.stem == split]
        if len({p.suffix for p in found}) > 1 or (single and len(found) > 1):
            names = [p.name for p in found]
            raise DataError(f"{base}: ambiguous files for split {split!r}: {names}; keep one")
        return found
    listing = sorted(p.name for p in folder.iterdir())
    raise DataError(
        f"{folder}: no file for split {split!r}; expected {split}.parquet, .jsonl, .json or .csv "
        f"(the folder has {listing})"
    )


def _read_file(path: Path, wanted: dict[str, str]) -> list[Row]:
    """Read and validate one local file (format chosen by its extension)."""
    ext = path.suffix.lower().lstrip(".")
    if ext == "parquet":
        rows = _read_parquet(path, wanted)
    elif ext in ("jsonl", "json", "csv"):
        raw = _text_bytes(path)
        try:
            text, undecodable = raw.decode("utf-8-sig"), False
        except UnicodeDecodeError:  # parse anyway, to say which row and column hold the bad bytes
            text, undecodable = raw.decode("utf-8-sig", errors="surrogateescape"), True
        if not text.strip():
            raise DataError(f"{path}: empty file: no data rows")
        read = _csv_records if ext == "csv" else _json_records
        try:
            records = list(read(path, text, wanted))
        except DataError:
            if undecodable:  # the encoding, not the format, is the likely cause (e.g. a UTF-16 export)
                _raise_undecodable(path, raw, [], wanted)
            raise
        if undecodable:
            _raise_undecodable(path, raw, records, wanted)
        rows = [Row(str(path), where, {f: values[c] for f, c in wanted.items()}) for where, values in records]
    else:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {list(EXTENSIONS)}",
            hint="convert the file to parquet, JSONL, JSON or CSV",
        )
    if not rows:
        raise DataError(f"{path}: empty file: no data rows")
    return rows


def _read_parquet(path: Path, wanted: dict[str, str]) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for empty or corrupt files
        raise DataError(
            f"{path}: empty or unreadable parquet file ({e})",
            hint="write the file again: it may be truncated, or not parquet",
        ) from e
    with parquet:
        _check_columns(str(path), "schema", parquet.schema_arrow.names, wanted)
        table = parquet.read(columns=list(dict.fromkeys(wanted.values())))
    data = {f: table.column(c).to_pylist() for f, c in wanted.items()}
    return [Row(str(path), f"row {i + 1}", {f: data[f][i] for f in wanted}) for i in range(table.num_rows)]


def _csv_records(path: Path, text: str, wanted: dict[str, str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield (position, record) for each CSV data row; every value stays a string."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((cells for cells in reader if cells), None)
        if header is None:
            return
        _check_columns(str(path), f"line {reader.line_num} (header)", header, wanted)
        row_no, prev_end = 0, reader.line_num
        for cells in reader:
            start, prev_end = prev_end + 1, reader.line_num
            if not cells:
                continue
            row_no += 1
            where = f"row {row_no} (line {start})"
            if len(cells) != len(header):
                raise DataError(
                    f"{path}: {where}: {len(cells)} values but the header has {len(header)} columns",
                    hint=f"fix line {start} of {path}: quote values that hold commas",
                )
            yield where, dict(zip(header, cells))
    except csv.Error as e:
        raise DataError(
            f"{path}: line {reader.line_num}: malformed CSV ({e})", hint=f"fix line {reader.line_num} of {path}"
        ) from e


def _json_records(path: Path, text: str, wanted: dict[str, str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (position, record) from a JSON array of objects, or from JSON Lines (one object a
    line; also accepted with a .json name, which is what `datasets` writes)."""
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {e.lineno}: invalid JSON ({e.msg})", hint=f"fix line {e.lineno} of {path}"
            ) from e
        numbered = ((f"row {i + 1}", item) for i, item in enumerate(items))
    else:
        numbered = _json_lines(path, text)
    for where, item in numbered:
        _check_object(path, where, item)
        _check_columns(str(path), where, list(item), wanted)
        yield where, item


def read_query_rows(path: Path) -> list[Row]:
    """The rows of a JSON Lines file of questions to predict (`heft predict --input`), as they stand:
    the task checks their fields (`parse_rows` names the line of a bad one)."""
    raw = _text_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        _raise_undecodable(path, raw, [], {})
    rows = []
    for where, item in _json_lines(path, text):
        _check_object(path, where, item)
        rows.append(Row(str(path), where, item))
    if not rows:
        raise DataError(f"{path}: empty file: no rows to predict", hint="write one JSON object per line")
    return rows


def _check_object(path: Path, where: str, item: Any) -> None:
    if not isinstance(item, dict):
        raise DataError(
            f"{path}: {where}: expected a JSON object, got {type(item).__name__}",
            hint=f"fix {where} of {path}: each row is an object of the task's fields",
        )


def _json_lines(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON allows raw U+2028
        if not line.strip():
            continue
        try:
            yield f"line {n}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {n}: invalid JSON ({e.msg})",
                hint=f"fix line {n} of {path}: JSON Lines hold one object per line",
            ) from e


def _check_columns(file: str, where: str, present: Sequence[str], wanted: dict[str, str]) -> None:
    for field, column in wanted.items():
        if column not in present:
            raise MissingColumn(file, where, field, column, list(present))


_UTF8_HINT = "re-save {path} as UTF-8, e.g. iconv -f <its encoding> -t UTF-8"


def _text_bytes(path: Path) -> bytes:
    """The bytes of a text file, refusing UTF-16 (a byte-order mark) and NUL bytes up front: NULs are
    valid UTF-8, and either would otherwise be reported as a broken CSV or JSON row."""
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(
            f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8; re-save the file as UTF-8",
            hint=_UTF8_HINT.format(path=path).replace("<its encoding>", "UTF-16"),
        )
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise DataError(
            f"{path}: line {line}: a NUL byte; the file looks UTF-16 or binary, not UTF-8 text",
            hint=_UTF8_HINT.format(path=path),
        )
    return raw


def _has_surrogates(text: str) -> bool:
    """True when decoding with surrogateescape had to escape invalid UTF-8 bytes."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _raise_undecodable(
    path: Path, raw: bytes, records: list[tuple[str, dict[str, Any]]], wanted: dict[str, str]
) -> None:
    """Report the first invalid UTF-8 byte: its row and column when it sits in a value."""
    fields = {c: f for f, c in wanted.items()}
    for where, values in records:
        for column, value in values.items():
            if isinstance(value, str) and _has_surrogates(value):
                field = f"field {fields[column]!r}" if column in fields else "unused column"
                byte = next(ord(ch) - 0xDC00 for ch in value if "\udc80" <= ch <= "\udcff")
                raise DataError(
                    f"{path}: {where}: {field} (column {column!r}): not valid UTF-8 (byte 0x{byte:02x}); "
                    "re-save the file as UTF-8",
                    hint=_UTF8_HINT.format(path=path),
                )
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        where = ", outside any value" if records else ""
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}{where}); re-save the file as UTF-8",
            hint=_UTF8_HINT.format(path=path),
        ) from None


def _read_hub(source: str, split: str, wanted: dict[str, str], subset: str | None = None) -> list[Row]:
    """Load a split from the hub; any failure becomes a `DataError` that says how to go local."""
    import datasets

    try:
        ds = datasets.load_dataset(source, name=subset, split=split)
    except Exception as e:  # network, auth, missing repo or split: all end the same way for the user
        env = os.environ.get("HEFT_DATA_DIR")
        env_note = f"HEFT_DATA_DIR={env!r} holds no matching files" if env else "HEFT_DATA_DIR is unset"
        raise DataError(
            f"could not load split {split!r} of hub dataset {hub_name(source, subset)!r} ({type(e).__name__}: {e}). "
            "If the hub is unreachable, set data.source to a local folder or file, or HEFT_DATA_DIR to a "
            f"folder holding <task>/<split>.parquet|.jsonl|.json|.csv ({env_note})."
        ) from e
    label = f"{hub_name(source, subset)} [{split}]"
    _check_columns(label, "schema", ds.column_names, wanted)
    data = ds.select_columns(list(dict.fromkeys(wanted.values()))).to_dict()
    rows = [Row(label, f"row {i + 1}", {f: data[c][i] for f, c in wanted.items()}) for i in range(len(ds))]
    if not rows:
        raise DataError(f"{label}: empty split: no data rows")
    return rows
