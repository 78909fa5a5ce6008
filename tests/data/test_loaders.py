"""SAT and CV-Bench loaders on synthetic files in the published layouts, and on broken ones."""

from __future__ import annotations

import io
import logging
import random

import pyarrow.parquet as pq
import pytest
from datasets import Dataset
from PIL import Image as PILImage

from visualthinker_ray.data.cvbench import answer_index, cvbench_prompt, load_cvbench
from visualthinker_ray.data.loading import LoadResult, is_hub_id
from visualthinker_ray.data.sat import format_sat_question, join_options, load_sat
from visualthinker_ray.toy import synthetic as syn

N_TRAIN, N_TEST = 60, 16
TWO_IMAGE_ROWS = (3, 23, 43)  # the synthetic writer's two-image train rows (one in 20)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    syn.make_synthetic(out, n_train=N_TRAIN, n_test=N_TEST, seed=0)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


def _raw(path):
    return pq.read_table(path).to_pylist()


def _png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


def _sat_file(path, rows):
    """A SAT-format parquet from (images, question, answers, question_type, correct_answer) rows."""
    keys = ["image_bytes", "question", "answers", "question_type", "correct_answer"]
    cols = {k: [r[i] for r in rows] for i, k in enumerate(keys)}
    cols["image_bytes"] = [
        None if ims is None else [{"bytes": b, "path": None} for b in ims] for ims in cols["image_bytes"]
    ]
    Dataset.from_dict(cols, features=syn.sat_features()).to_parquet(str(path))
    return path


# ---------------------------------------------------------------- SAT


def test_load_sat_reads_the_split_and_skips_two_image_rows(data, cache, caplog):
    caplog.set_level(logging.INFO)
    res = load_sat(data / "SAT", "train", cache_dir=cache)
    assert isinstance(res, LoadResult)
    assert res.rows_read == N_TRAIN
    assert res.skipped == {"multi_image": len(TWO_IMAGE_ROWS)} and res.first_error is None
    assert any("skipped 3 two-image rows" in m for m in caplog.messages)
    kept = [i for i in range(N_TRAIN) if i not in TWO_IMAGE_ROWS]
    assert [r.id for r in res.records] == [f"sat-train-{i}" for i in kept]
    raw = _raw(data / "SAT" / "SAT_train.parquet")
    for rec in res.records:
        row = raw[rec.meta["row"]]
        assert rec.source == "SAT" and rec.question_type == row["question_type"]
        assert rec.gold == row["correct_answer"] and rec.gold in rec.choices
        assert sorted(rec.choices) == sorted(row["answers"])
        # Images stay encoded: the very bytes of the file, not decoded pixels.
        assert rec.images == (row["image_bytes"][0]["bytes"],)
        assert isinstance(rec.images[0], bytes)


def test_load_sat_can_keep_two_image_rows(data, cache):
    res = load_sat(data / "SAT", "train", skip_multi_image=False, cache_dir=cache)
    assert len(res.records) == N_TRAIN and res.skipped == {}
    two = [r for r in res.records if len(r.images) == 2]
    assert [r.meta["row"] for r in two] == list(TWO_IMAGE_ROWS)
    assert {r.question_type for r in two} == {syn.MOTION_TYPE}


def test_limit_takes_the_first_rows_of_the_split(data, cache):
    res = load_sat(data / "SAT", "train", limit=10, cache_dir=cache)
    assert res.rows_read == 10 and res.skipped == {"multi_image": 1}
    assert [r.meta["row"] for r in res.records] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    full = load_sat(data / "SAT", "train", cache_dir=cache)
    assert res.records == full.records[:9]  # a row's shuffle does not depend on the limit


def test_other_splits_and_a_parquet_file_path(data, cache):
    val = load_sat(data / "SAT", "val", cache_dir=cache)
    assert len(val.records) == N_TEST and val.skipped == {}
    assert val.records[0].id == "sat-val-0"
    by_file = load_sat(data / "SAT" / "SAT_val.parquet", "val", cache_dir=cache)
    assert by_file.records == val.records
    static = load_sat(data / "SAT", "static", limit=5, cache_dir=cache)
    assert [r.id for r in static.records] == [f"sat-static-{i}" for i in range(5)]


def test_option_shuffle_is_seeded_and_keeps_the_gold_text(data, cache):
    a = load_sat(data / "SAT", "val", seed=0, cache_dir=cache).records
    b = load_sat(data / "SAT", "val", seed=0, cache_dir=cache).records
    c = load_sat(data / "SAT", "val", seed=1, cache_dir=cache).records
    plain = load_sat(data / "SAT", "val", shuffle_options=False, cache_dir=cache).records
    raw = _raw(data / "SAT" / "SAT_val.parquet")
    assert a == b
    assert [r.choices for r in a] != [r.choices for r in c]
    assert [r.choices for r in plain] == [tuple(row["answers"]) for row in raw]
    assert [r.choices for r in a] != [r.choices for r in plain]
    for x, y, p in zip(a, c, plain, strict=True):
        assert x.gold == y.gold == p.gold  # the gold is the option text, wherever it lands
        assert set(x.choices) == set(y.choices) == set(p.choices)
        assert x.gold_letter == "ABCD"[x.choices.index(x.gold)]


def _train_records(data, *overrides):
    from visualthinker_ray.config import load_config
    from visualthinker_ray.data.sat import load_train_records

    return load_train_records(load_config(None, [f"data.train={data / 'SAT'}", *overrides])).records


def test_lettered_fraction_shows_training_questions_the_cvbench_way(data):
    plain = _train_records(data)
    assert not any(r.id.endswith("-lettered") for r in plain)  # the default (paper): SAT layout only
    every = _train_records(data, "data.lettered_fraction=1")
    for p, r in zip(plain, every, strict=True):
        bare = p.meta["raw_question"]
        options = [f"({'ABCD'[i]}) {c}" for i, c in enumerate(p.choices)]
        assert r.question.split("\n") == [f"{bare} Select from the following choices.", *options]
        assert (r.id, r.choices, r.gold, r.images) == (f"{p.id}-lettered", p.choices, p.gold, p.images)
    half = [r.id.endswith("-lettered") for r in _train_records(data, "data.lettered_fraction=0.5")]
    assert 0.3 < sum(half) / len(half) < 0.7
    again = [r.id.endswith("-lettered") for r in _train_records(data, "data.lettered_fraction=0.5")]
    other = [
        r.id.endswith("-lettered") for r in _train_records(data, "data.lettered_fraction=0.5", "data.seed=1")
    ]
    assert half == again and half != other  # drawn per row from data.seed


def test_lettered_fraction_out_of_range_is_refused():
    from visualthinker_ray.config import ConfigError, load_config
    from visualthinker_ray.data.sat import with_lettered

    with pytest.raises(ConfigError, match="lettered_fraction"):
        load_config(None, ["data.lettered_fraction=1.5"])
    with pytest.raises(ValueError, match="lettered_fraction must be in"):
        with_lettered([], -0.1, 0)


def test_question_template_is_exact(tmp_path, cache):
    png = _png()
    path = _sat_file(
        tmp_path / "SAT_train.parquet",
        [
            ([png], "Is the cup to the left of the plate?", ["left", "right"], "spatial", "left"),
            ([png], "What color is the cup?", ["red", "green", "blue"], "color", "green"),
            ([png], " How many cups are there? ", ["1", "2", "3", "4"], "count", "3"),
        ],
    )
    recs = load_sat(path, shuffle_options=False, cache_dir=cache).records
    assert [r.question for r in recs] == [
        "Answer in natural language. Is the cup to the left of the plate? "
        "Choose between the following options: left or right",
        "Answer in natural language. What color is the cup? Choose between the following options: red, green or blue",
        "Answer in natural language. How many cups are there? Choose between the following options: 1, 2, 3 or 4",
    ]
    shuffled = load_sat(path, seed=5, cache_dir=cache).records
    for r in shuffled:  # the shown options follow the shuffled order
        assert r.question.endswith(f"Choose between the following options: {join_options(r.choices)}")
    assert join_options(["a", "b", "c"]) == "a, b or c" and join_options(["a", "b"]) == "a or b"
    assert format_sat_question("Q?", ["x", "y"]) == (
        "Answer in natural language. Q? Choose between the following options: x or y"
    )


def test_bad_rows_are_skipped_counted_and_logged(tmp_path, cache, caplog):
    png = _png()
    rows = [
        ([png], "Good one?", ["yes", "no"], "t", "yes"),
        ([b"this is not an image"], "Corrupt image?", ["yes", "no"], "t", "yes"),
        ([png[: len(png) // 2]], "Truncated image?", ["yes", "no"], "t", "no"),
        ([png], "Gold not an option?", ["yes", "no"], "t", "maybe"),
        ([png], None, ["yes", "no"], "t", "yes"),  # missing question
        ([png], "No answers?", None, "t", "yes"),
        ([png], "Repeated option?", ["yes", "yes"], "t", "yes"),
        (None, "No image?", ["yes", "no"], "t", "yes"),
        ([png], "Good two?", ["up", "down"], "t", "down"),
    ]
    path = _sat_file(tmp_path / "SAT_train.parquet", rows)
    res = load_sat(path, cache_dir=cache)
    assert [r.id for r in res.records] == ["sat-train-0", "sat-train-8"]
    assert res.rows_read == 9
    assert res.skipped == {"bad_image": 2, "bad_field": 5}
    assert res.first_error.startswith("row 1 image 0: image cannot be opened")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("skipped 7 bad rows of 9" in r.getMessage() and "row 1" in r.getMessage() for r in warnings)


def test_a_file_with_no_usable_row_raises_naming_file_and_reason(tmp_path, cache):
    path = _sat_file(tmp_path / "broken.parquet", [([b"junk"], "Q?", ["a", "b"], "t", "a")] * 3)
    with pytest.raises(ValueError, match=r"broken\.parquet.*image cannot be opened"):
        load_sat(path, cache_dir=cache)
    only_two = _sat_file(
        tmp_path / "two.parquet", [([_png(), _png()], "Moved?", ["left", "right"], "t", "left")]
    )
    with pytest.raises(ValueError, match=r"two\.parquet.*two-image"):
        load_sat(only_two, cache_dir=cache)


def test_a_missing_column_is_named(tmp_path, cache):
    path = tmp_path / "SAT_train.parquet"
    Dataset.from_dict({"question": ["Q?"], "answers": [["a", "b"]]}).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"SAT_train\.parquet.*missing column.*image_bytes"):
        load_sat(path, cache_dir=cache)


def test_empty_and_non_parquet_files_are_named(tmp_path, cache):
    # An all-3D CV-Bench once left an empty test_2d.parquet; `datasets` then said only
    # 'Instruction "test" corresponds to no data!'.
    empty = tmp_path / "CV-Bench"
    empty.mkdir()
    Dataset.from_dict({k: [] for k in syn.cvbench_features()}, features=syn.cvbench_features()).to_parquet(
        str(empty / "test_2d.parquet")
    )
    syn.write_cvbench(tmp_path / "full", 4, seed=0)
    (empty / "test_3d.parquet").write_bytes((tmp_path / "full" / "test_3d.parquet").read_bytes())
    with pytest.raises(ValueError, match=r"test_2d\.parquet has no rows"):
        load_cvbench(empty, cache_dir=cache)
    garbage = tmp_path / "SAT_train.parquet"
    garbage.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"SAT_train\.parquet is not a readable parquet file"):
        load_sat(garbage, cache_dir=cache)


def test_the_split_cvbench_layout_refuses_to_write_an_empty_file(tmp_path):
    with pytest.raises(ValueError, match="needs 2D and 3D rows"):
        syn.write_cvbench(tmp_path, 1, layout="split")
    assert syn.write_cvbench(tmp_path, 1, layout="single") == {"test.parquet": {"rows": 1}}


def test_missing_paths_say_what_is_expected(tmp_path, cache):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as e:
        load_sat(missing, cache_dir=cache)
    assert "SAT_train.parquet" in str(e.value) and "array/SAT" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"SAT_val\.parquet"):
        load_sat(tmp_path, "val", cache_dir=cache)  # a folder without the split's file
    with pytest.raises(FileNotFoundError, match="CV-Bench"):
        load_cvbench(missing, cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"test_2d\.parquet.*test\.parquet"):
        load_cvbench(tmp_path, cache_dir=cache)


def test_hub_ids_are_told_from_paths():
    assert is_hub_id("array/SAT") and is_hub_id("nyu-visionx/CV-Bench")
    for not_hub in ("/data/SAT", "./SAT/x", "SAT", "a/b/c", "data/SAT_train.parquet"):
        assert not is_hub_id(not_hub), not_hub


# ---------------------------------------------------------------- CV-Bench


def _cvbench_rows(folder):
    return [row for name in ("test_2d.parquet", "test_3d.parquet") for row in _raw(folder / name)]


def test_load_cvbench_split_layout(data, cache):
    res = load_cvbench(data / "CV-Bench", cache_dir=cache)
    raw = _cvbench_rows(data / "CV-Bench")
    assert res.rows_read == N_TEST and res.skipped == {} and len(res.records) == N_TEST
    assert [r.id for r in res.records] == [f"cvbench-{i}" for i in range(N_TEST)]
    for rec, row in zip(res.records, raw, strict=True):
        letter = row["answer"].strip("()")
        assert rec.question == row["prompt"] and rec.choices == tuple(row["choices"])
        assert rec.gold == row["choices"]["ABCDEFGH".index(letter)] and rec.gold_letter == letter
        assert rec.question_type == row["task"] and rec.source == row["source"]
        assert rec.meta == {"idx": row["idx"], "type": row["type"]}
        assert rec.images == (row["image"]["bytes"],)
    assert {r.meta["type"] for r in res.records[: N_TEST // 2]} == {"2D"}
    assert {r.meta["type"] for r in res.records[N_TEST // 2 :]} == {"3D"}


def test_load_cvbench_single_file_layout_matches(data, tmp_path, cache):
    syn.write_cvbench(tmp_path, N_TEST, seed=0, layout="single")
    single = load_cvbench(tmp_path, cache_dir=cache)
    assert single.files == (str(tmp_path / "test.parquet"),)
    assert single.records == load_cvbench(data / "CV-Bench", cache_dir=cache).records
    assert load_cvbench(tmp_path / "test.parquet", cache_dir=cache).records == single.records


def test_cvbench_limit_spans_both_files(data, cache):
    res = load_cvbench(data / "CV-Bench", limit=10, cache_dir=cache)
    assert res.rows_read == 10
    assert [r.meta["idx"] for r in res.records] == list(range(10))
    assert [r.meta["type"] for r in res.records].count("3D") == 10 - N_TEST // 2


def test_cvbench_bad_rows_are_skipped_and_an_all_bad_file_raises(tmp_path, cache):
    q = syn.make_cvbench_question(random.Random(0), "Depth")
    good = {
        "idx": 0,
        "type": "3D",
        "task": "Depth",
        "image": {"bytes": syn.scene_png(q.scenes[0]), "path": None},
        "question": q.question,
        "choices": list(q.answers),
        "answer": f"({'AB'[q.answers.index(q.correct_answer)]})",
        "prompt": cvbench_prompt(q.question, q.answers),
        "source": "Omni3D",
    }
    bad = [
        {**good, "idx": 1, "image": {"bytes": b"\x89PNG broken", "path": None}},
        {**good, "idx": 2, "answer": "(Z)"},
        {**good, "idx": 3, "choices": None},
        {**good, "idx": 4, "prompt": None},
        {**good, "idx": 0},  # a repeated idx would give two records one id
    ]
    rows = [good, *bad]
    cols = {k: [r[k] for r in rows] for k in good}
    Dataset.from_dict(cols, features=syn.cvbench_features()).to_parquet(str(tmp_path / "test.parquet"))
    res = load_cvbench(tmp_path, cache_dir=cache)
    assert [r.id for r in res.records] == ["cvbench-0"] and res.records[0].gold == q.correct_answer
    assert res.skipped == {"bad_image": 1, "bad_field": 4} and res.rows_read == 6
    assert "test.parquet row 1" in res.first_error

    cols = {k: [r[k] for r in bad[:3]] for k in good}
    Dataset.from_dict(cols, features=syn.cvbench_features()).to_parquet(str(tmp_path / "all_bad.parquet"))
    with pytest.raises(ValueError, match=r"all_bad\.parquet.*image cannot be opened"):
        load_cvbench(tmp_path / "all_bad.parquet", cache_dir=cache)


def test_answer_letters():
    assert answer_index("(A)", 2) == 0 and answer_index("b", 2) == 1 and answer_index(" (C) ", 4) == 2
    assert answer_index("(C)", 2) is None and answer_index("AB", 4) is None and answer_index("", 4) is None
