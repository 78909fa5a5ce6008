"""SAT (HF `array/SAT`) as prompt records, the way the reference run used it: the first
`limit` rows of a split, two-image rows skipped, options shuffled with a seed, gold = option TEXT.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from visualthinker_ray.data.loading import (
    BAD_FIELD,
    MULTI_IMAGE,
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
from visualthinker_ray.data.records import PromptRecord
from visualthinker_ray.errors import InputError

SAT_HUB_ID = "array/SAT"
SAT_COLUMNS = ("image_bytes", "question", "answers", "question_type", "correct_answer")


def join_options(options: list[str] | tuple[str, ...]) -> str:
    """ "a, b or c"; "a or b"; a single option as is."""
    if len(options) < 2:
        return "".join(options)
    return ", ".join(options[:-1]) + " or " + options[-1]


def format_sat_question(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The question text the reference run showed the model."""
    return (
        f"Answer in natural language. {question.strip()} "
        f"Choose between the following options: {join_options(options)}"
    )


def _expected(split: str) -> str:
    return f"a folder with SAT_{split}.parquet, a parquet file, or a hub id like {SAT_HUB_ID}"


def _open_split(source: str | Path, split: str, cache_dir: str | None):
    """(dataset, description for messages) for a folder, a parquet file or a hub id."""
    path = Path(source)
    if path.is_dir():
        file = path / f"SAT_{split}.parquet"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; expected {_expected(split)}")
        return load_parquet(file, split, cache_dir), str(file)
    if path.is_file():
        return load_parquet(path, split, cache_dir), str(path)
    if isinstance(source, str) and is_hub_id(source):
        from datasets import load_dataset

        files = {split: f"SAT_{split}.parquet"}
        ds = load_dataset(source, data_files=files, split=split, cache_dir=cache_dir)
        return ds, f"{source} (SAT_{split}.parquet)"
    raise missing_source_error(source, _expected(split))


def sat_record(
    row: dict,
    row_index: int,
    split: str,
    shuffle_options: bool = True,
    seed: int = 0,
    skip_multi_image: bool = True,
) -> PromptRecord:
    """One SAT row as a record; raises BadRow (with the skip reason) when it cannot be one."""
    where = f"row {row_index}"
    images = row.get("image_bytes")
    if not isinstance(images, list) or not images:
        raise BadRow(BAD_FIELD, f"{where}: field 'image_bytes' must be a non-empty list of images")
    if skip_multi_image and len(images) > 1:
        raise BadRow(MULTI_IMAGE, f"{where}: {len(images)} images")
    question = text_field(row, "question", where)
    answers = options_field(row, "answers", where)
    question_type = text_field(row, "question_type", where, allow_empty=True)
    gold = text_field(row, "correct_answer", where)
    if gold not in answers:
        raise BadRow(BAD_FIELD, f"{where}: correct_answer {gold!r} is not among answers {answers!r}")
    encoded = tuple(encoded_image(item, f"{where} image {k}") for k, item in enumerate(images))
    options = list(answers)
    if shuffle_options:
        # One generator per row: a row's order depends on (seed, split, row) only, not on `limit`.
        random.Random(f"sat-options/{seed}/{split}/{row_index}").shuffle(options)
    return PromptRecord(
        id=f"sat-{split}-{row_index}",
        images=encoded,
        question=format_sat_question(question, options),
        gold=gold,
        choices=tuple(options),
        question_type=question_type,
        source="SAT",
        meta={"split": split, "row": row_index, "raw_question": question},
    )


def load_sat(
    source: str | Path = SAT_HUB_ID,
    split: str = "train",
    limit: int | None = None,
    shuffle_options: bool = True,
    seed: int = 0,
    skip_multi_image: bool = True,
    cache_dir: str | None = None,
) -> LoadResult:
    """Records from the first `limit` rows of a SAT split (a folder with SAT_{split}.parquet, a
    parquet file, or a hub id). Two-image rows are skipped by default; a row with a corrupt image
    or a missing/ill-typed field is skipped and counted; ValueError when none is usable."""
    ds, what = _open_split(source, split, cache_dir)
    require_columns(ds, SAT_COLUMNS, what)
    tally = Tally()
    for i, row in enumerate(iter_encoded_rows(ds, limit)):
        tally.row_read()
        try:
            tally.result.records.append(sat_record(row, i, split, shuffle_options, seed, skip_multi_image))
        except BadRow as bad:
            tally.skip(bad)
    return tally.finish(what, (what,))


def lettered_variant(record: PromptRecord) -> PromptRecord:
    """The record with its question shown the CV-Bench way: the bare question, then "Select from the
    following choices." and lettered options, one per line. The same choices and gold.

    A real base model has read text in many layouts; the tiny one only knows what the warm-up and
    RL show it. Without this variant in the warm-up it answers CV-Bench-style prompts with words
    that are none of the options (held-out accuracy far BELOW chance before any RL); without it in
    RL (data.lettered_fraction) what it learns on SAT's layout may not carry over to CV-Bench's.
    """
    from visualthinker_ray.data.cvbench import cvbench_prompt

    bare = record.meta.get("raw_question")
    if not bare:
        raise ValueError(f"record {record.id}: no raw_question in meta (not a SAT record?)")
    return replace(record, id=f"{record.id}-lettered", question=cvbench_prompt(bare, record.choices))


def with_lettered(records: list[PromptRecord], fraction: float, seed: int) -> list[PromptRecord]:
    """Each record shown the CV-Bench way (lettered_variant) with probability `fraction`, drawn per
    record from `seed` (the same records for the same seed); 0 leaves the list as it is."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"data.lettered_fraction must be in [0, 1], got {fraction}")
    if fraction == 0.0:
        return records
    rng = random.Random(f"lettered:{seed}")
    return [lettered_variant(r) if rng.random() < fraction else r for r in records]


def load_train_records(cfg) -> LoadResult:
    """The training prompts a Config names (data.train, split, limit, shuffling, seed, two-image rows)."""
    d = cfg.data
    result = load_sat(
        d.train,
        split=d.train_split,
        limit=d.train_limit,
        shuffle_options=d.shuffle_options,
        seed=d.seed,
        skip_multi_image=d.skip_multi_image,
    )
    result.records = with_lettered(result.records, d.lettered_fraction, d.seed)
    return result
