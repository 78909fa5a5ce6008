"""What the SAT and CV-Bench loaders share: the result type, source resolution, row reading with
images kept encoded, and the per-row checks that skip (and count) a bad row instead of failing late.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image as PILImage

from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.errors import InputError

log = logging.getLogger(__name__)

# Skip reasons, the keys of LoadResult.skipped.
MULTI_IMAGE = "multi_image"  # expected and by choice, not an error
BAD_IMAGE = "bad_image"
BAD_FIELD = "bad_field"

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class LoadResult:
    records: list[PromptRecord]
    rows_read: int = 0  # rows looked at (the first `limit` rows when a limit is given)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows
    first_error: str | None = None  # the first bad row's problem (two-image skips are not errors)
    files: tuple[str, ...] = ()  # what was read: local files, or a hub id

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


class BadRow(Exception):
    """A row that cannot become a record; `reason` is one of the skip reasons above."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def is_hub_id(source: str) -> bool:
    """ "owner/name" with no path prefix and no file suffix, e.g. array/SAT or nyu-visionx/CV-Bench."""
    return bool(_HUB_ID.fullmatch(source)) and not source.endswith(".parquet")


def missing_source_error(source: str | Path, expected: str) -> FileNotFoundError:
    return FileNotFoundError(f"data source {str(source)!r} does not exist; expected {expected}")


def load_parquet(path: str | Path, split: str = "train", cache_dir: str | None = None):
    """A local parquet file as an HF Dataset, through `datasets`' own parquet builder."""
    import pyarrow.parquet as pq
    from datasets import load_dataset

    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as e:  # not parquet at all: say which file, not the builder's internals
        raise InputError(f"{path} is not a readable parquet file ({e})") from e
    if rows == 0:  # `datasets` would say 'Instruction "train" corresponds to no data!'
        raise InputError(f"{path} has no rows; regenerate or remove it")
    return load_dataset("parquet", data_files={split: str(path)}, split=split, cache_dir=cache_dir)


def iter_encoded_rows(ds, limit: int | None = None, batch_size: int = 256) -> Iterator[dict]:
    """The first `limit` rows as plain dicts, images left as {"bytes", "path"} structs.

    Arrow-format reads never decode images. (Casting a List(Image()) column to decode=False would
    rewrite the whole column to a new cache file; a plain Image() column could be cast cheaply.)
    """
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    for batch in ds.with_format("arrow").iter(batch_size=batch_size):
        yield from batch.to_pylist()


def require_columns(ds, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise InputError(f"{what}: missing column(s) {missing}; found {ds.column_names}")


def encoded_image(item: object, where: str) -> bytes:
    """Encoded bytes of one image cell ({"bytes", "path"} struct or raw bytes), verified by PIL."""
    data = item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(data, bytes) or not data:
        raise BadRow(BAD_IMAGE, f"{where}: no encoded image bytes (got {type(data).__name__})")
    try:
        with PILImage.open(io.BytesIO(data)) as img:
            img.verify()  # checks the header and, for PNG, every chunk's CRC, without decoding
    except Exception as e:  # PIL signals bad data with many exception types (OSError, SyntaxError, ...)
        raise BadRow(BAD_IMAGE, f"{where}: image cannot be opened: {type(e).__name__}: {e}") from e
    return data


def text_field(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not (allow_empty or value.strip()):
        raise BadRow(BAD_FIELD, f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def options_field(row: dict, name: str, where: str) -> list[str]:
    """A list of at least two distinct option strings (duplicates would make the gold ambiguous)."""
    value = row.get(name)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise BadRow(BAD_FIELD, f"{where}: field {name!r} must be a list of non-empty strings, got {value!r}")
    if len(value) < 2:
        raise BadRow(BAD_FIELD, f"{where}: field {name!r} needs at least two options, got {value!r}")
    if len(set(value)) != len(value):
        raise BadRow(BAD_FIELD, f"{where}: field {name!r} repeats an option: {value!r}")
    return value


class Tally:
    """Counts rows and skip reasons while a loader walks its rows."""

    def __init__(self) -> None:
        self.result = LoadResult(records=[])

    def row_read(self) -> None:
        self.result.rows_read += 1

    def skip(self, bad: BadRow) -> None:
        self.result.skipped[bad.reason] = self.result.skipped.get(bad.reason, 0) + 1
        if bad.reason != MULTI_IMAGE and self.result.first_error is None:
            self.result.first_error = str(bad)

    def finish(self, what: str, files: tuple[str, ...]) -> LoadResult:
        """Log the skips; raise when nothing usable is left, naming the data and the first reason."""
        r = self.result
        r.files = files
        if r.skipped.get(MULTI_IMAGE):
            log.info("%s: skipped %d two-image rows of %d", what, r.skipped[MULTI_IMAGE], r.rows_read)
        bad = r.n_skipped - r.skipped.get(MULTI_IMAGE, 0)
        if bad:
            log.warning("%s: skipped %d bad rows of %d; first: %s", what, bad, r.rows_read, r.first_error)
        if not r.records:
            reason = r.first_error or (
                f"all {r.rows_read} rows were two-image rows" if r.rows_read else "it has no rows"
            )
            raise InputError(f"{what}: no usable rows ({r.rows_read} read, skipped {r.skipped}); {reason}")
        return r
