"""CV-Bench (HF `nyu-visionx/CV-Bench`, split test) as prompt records for evaluation (the reference recipe):
question = the lettered `prompt`, gold = the text of the choice the `answer` letter names.

Two local layouts: test_2d.parquet + test_3d.parquet (the current hub files) or one test.parquet
(the older layout).
"""

from __future__ import annotations

import re
from pathlib import Path

from visualthinker_ray.data.loading import (
    BAD_FIELD,
    BadRow,
    LoadResult,
    Tally,
    encoded_image,
    is_hub_id,
    iter_encoded_rows,
    load_parquet,
    missing_source_error,
    options_field,
    require_columns,
    text_field,
)
from visualthinker_ray.data.records import LETTERS, PromptRecord

CVBENCH_HUB_ID = "nyu-visionx/CV-Bench"
CVBENCH_COLUMNS = ("idx", "type", "task", "image", "choices", "answer", "prompt", "source")
SPLIT_FILES = ("test_2d.parquet", "test_3d.parquet")
SINGLE_FILE = "test.parquet"
EXPECTED = (
    f"a folder with {' + '.join(SPLIT_FILES)} or {SINGLE_FILE}, a parquet file, "
    f"or a hub id like {CVBENCH_HUB_ID}"
)

_ANSWER = re.compile(r"\(?\s*([A-Za-z])\s*\)?")


def answer_index(answer: str, n_choices: int) -> int | None:
    """ "(A)" (or "A") -> 0; None when it names no choice."""
    m = _ANSWER.fullmatch(answer.strip())
    if not m:
        return None
    i = LETTERS.index(m.group(1).upper())
    return i if i < n_choices else None


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        split = [path / f for f in SPLIT_FILES]
        if all(f.is_file() for f in split):
            return split
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        raise FileNotFoundError(
            f"{path} has neither {' + '.join(SPLIT_FILES)} nor {SINGLE_FILE}; expected {EXPECTED}"
        )
    raise missing_source_error(path, EXPECTED)


def _open(source: str | Path, cache_dir: str | None) -> list[tuple[object, str]]:
    """[(dataset, description)] in row order: 2D before 3D for the split layout."""
    path = Path(source)
    if not path.exists() and isinstance(source, str) and is_hub_id(source):
        from datasets import load_dataset

        return [(load_dataset(source, split="test", cache_dir=cache_dir), f"{source} (split test)")]
    return [(load_parquet(f, "test", cache_dir), str(f)) for f in _local_files(path)]


def cvbench_record(row: dict, where: str) -> PromptRecord:
    """One CV-Bench row as a record; raises BadRow when it cannot be one."""
    idx = row.get("idx")
    if not isinstance(idx, int) or isinstance(idx, bool):
        raise BadRow(BAD_FIELD, f"{where}: field 'idx' must be an integer, got {idx!r}")
    choices = options_field(row, "choices", where)
    answer = text_field(row, "answer", where)
    k = answer_index(answer, len(choices))
    if k is None:
        raise BadRow(BAD_FIELD, f"{where}: answer {answer!r} names none of the {len(choices)} choices")
    image = encoded_image(row.get("image"), f"{where} image")
    return PromptRecord(
        id=f"cvbench-{idx}",
        images=(image,),
        question=text_field(row, "prompt", where),
        gold=choices[k],
        choices=tuple(choices),
        question_type=text_field(row, "task", where),
        source=text_field(row, "source", where),
        meta={"idx": idx, "type": text_field(row, "type", where)},
    )


def load_cvbench(
    source: str | Path = CVBENCH_HUB_ID, limit: int | None = None, cache_dir: str | None = None
) -> LoadResult:
    """Records from the first `limit` CV-Bench rows (2D rows first in the split layout). A row with
    a corrupt image or a missing/ill-typed field is skipped and counted; ValueError when none is
    usable. Rows keep their order, so results line up with `idx`."""
    parts = _open(source, cache_dir)
    tally = Tally()
    seen: set[int] = set()
    for ds, what in parts:
        require_columns(ds, CVBENCH_COLUMNS, what)
        left = None if limit is None else limit - tally.result.rows_read
        if left is not None and left <= 0:
            break
        for i, row in enumerate(iter_encoded_rows(ds, left)):
            tally.row_read()
            try:
                record = cvbench_record(row, f"{Path(what).name} row {i}")
                if record.meta["idx"] in seen:
                    raise BadRow(BAD_FIELD, f"{what} row {i}: duplicate idx {record.meta['idx']}")
                seen.add(record.meta["idx"])
                tally.result.records.append(record)
            except BadRow as bad:
                tally.skip(bad)
    files = tuple(what for _, what in parts)
    return tally.finish(" + ".join(files), files)


def cvbench_prompt(question: str, choices: list[str] | tuple[str, ...]) -> str:
    """CV-Bench's `prompt` column: the question, then the lettered choices."""
    lines = [f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(choices)]
    return f"{question} Select from the following choices.\n" + "\n".join(lines)
