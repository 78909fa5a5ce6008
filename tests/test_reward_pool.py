"""The reward pool with real Ray actors on the loopback: grading, errors, soft and hard timeouts, restarts."""

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from tests import plugins_for_tests as plugins
from visualthinker_ray.config import Config
from visualthinker_ray.reward_pool import (
    GraderTimeout,
    RewardPool,
    call_with_time_limit,
    count_outcomes,
)
from visualthinker_ray.rewards import reward_fns_from_config, score_completion, self_reflection

PLUGINS = "tests.plugins_for_tests"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def make_cfg(num_workers=1, timeout_s=5.0, plugins=(), **reward):
    plugin_list = [{"name": name, "function": f"{PLUGINS}:{name}"} for name in plugins]
    return Config.model_validate(
        {"reward": {"num_workers": num_workers, "timeout_s": timeout_s, "plugins": plugin_list, **reward}}
    )


def item(completion, gold="left", choices=("left", "right")):
    return {"completion": completion, "gold": gold, "choices": list(choices) if choices else None}


def grade_within(pool, items, seconds):
    """pool.grade(items), failing (not hanging) if it takes over ``seconds``: the bound under test."""
    box = {}

    def run():
        try:
            box["out"] = pool.grade(items)
        except BaseException as err:  # re-raised below, in the test's thread
            box["err"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"pool.grade did not return within {seconds}s"
    if "err" in box:
        raise box["err"]
    return box["out"]


def builtin_items():
    """A few dozen distinct items: right, wrong, malformed, letter answers, free-form, an "aha"."""
    out = []
    for k in range(6):
        out += [
            item(f"step {k} </think> <answer>left</answer>"),
            item(f"step {k} </think><answer>right</answer>"),
            item(f"step {k} no tags, left"),
            item(f"step {k} </think> <answer>B</answer>", gold="right"),
            item(f"step {k} </think> <answer>(A) left</answer>", gold="A"),
            item(f"wait, let me re-check {k} </think> <answer>{k}</answer>", gold="3", choices=None),
            item(f"step {k} </think> <answer>A or B</answer>", gold="left"),
        ]
    return out


def test_builtin_grading_equals_score_completion_in_order():
    cfg = make_cfg(num_workers=2, format_weight=0.5, accuracy_weight=2.0)
    items = builtin_items()
    pool = RewardPool(cfg)
    try:
        out = pool.grade(items)
        empty = pool.grade([])
    finally:
        pool.shutdown()
    assert (empty.results, empty.timeouts, empty.errors) == ([], 0, 0)
    fns = reward_fns_from_config(cfg.reward)
    expected = [score_completion(i["completion"], i["gold"], i["choices"], fns) for i in items]
    assert [{k: r[k] for k in ("format", "accuracy", "total")} for r in out.results] == expected
    assert [r["self_reflection"] for r in out.results] == [self_reflection(i["completion"]) for i in items]
    assert any(r["self_reflection"] for r in out.results) and not all(
        r["self_reflection"] for r in out.results
    )
    assert len({r["total"] for r in out.results}) > 2  # the items really differ
    assert (out.timeouts, out.errors, out.restarts, out.first_error) == (0, 0, 0, None)
    assert not any(r["timed_out"] or r["error"] for r in out.results)


def test_raising_plugin_scores_zero_and_keeps_its_traceback(caplog):
    cfg = make_cfg(plugins=["raises", "always_one"])
    items = [item("</think><answer>left</answer>"), item(f"{plugins.RAISE} </think><answer>left</answer>")]
    pool = RewardPool(cfg)
    try:
        with caplog.at_level(logging.WARNING, logger="visualthinker_ray.reward_pool"):
            out = pool.grade(items)
            again = pool.grade(items)
    finally:
        pool.shutdown()
    good, bad = out.results
    assert (good["raises"], good["total"], good["error"]) == (0.5, 3.5, None)
    assert (bad["raises"], bad["format"], bad["accuracy"], bad["always_one"], bad["total"]) == (0, 1, 1, 1, 3)
    assert (out.errors, out.timeouts) == (1, 0) and not bad["timed_out"]
    assert out.first_error == bad["error"]
    assert "'raises'" in out.first_error and "planted failure in the raises plug-in" in out.first_error
    assert "Traceback" in out.first_error
    assert again.errors == 1 and again.first_error is not None
    logged = [r.getMessage() for r in caplog.records if "planted failure" in r.getMessage()]
    assert len(logged) == 1 and "'raises'" in logged[0]  # logged once, naming the reward


def spin(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_soft_timeout_interrupts_python_hangs_without_ray():
    for fn in (lambda: time.sleep(5), lambda: spin(5)):  # 5 s: a broken time limit fails, not hangs
        start = time.monotonic()
        with pytest.raises(GraderTimeout):
            call_with_time_limit(fn, 0.2)
        assert time.monotonic() - start < 2
    assert call_with_time_limit(lambda: 3.0, 0.2) == 3.0


def test_python_hang_in_actor_times_out_softly():
    cfg = make_cfg(timeout_s=0.5, plugins=["hangs_python"])
    items = [item("</think><answer>left</answer>"), item(f"{plugins.HANG} </think><answer>left</answer>")]
    pool = RewardPool(cfg, slack_s=30.0)  # a long slack: only the soft timeout can answer in time
    try:
        out = grade_within(pool, items, 10)
    finally:
        pool.shutdown()
    good, hung = out.results
    assert (good["hangs_python"], good["total"], good["timed_out"]) == (0.25, 2.25, False)
    assert (hung["hangs_python"], hung["format"], hung["accuracy"], hung["total"]) == (0, 1, 1, 2)
    assert hung["timed_out"] and hung["error"] is None
    assert (out.timeouts, out.errors, out.restarts) == (1, 0, 0)


def test_c_hang_ignores_the_soft_timeout():
    """The hangs_c plug-in really is out of SIGALRM's reach (else the next test proves nothing)."""
    code = (
        "from tests import plugins_for_tests as p; from visualthinker_ray.reward_pool import call_with_time_limit;"
        "call_with_time_limit(lambda: p.hangs_c(p.HANG, '', None), 0.2); print('interrupted')"
    )
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, timeout=3, cwd=Path(__file__).parents[1]
        )


def test_c_hang_hits_the_hard_deadline_and_the_actor_restarts():
    cfg = make_cfg(timeout_s=0.5, plugins=["hangs_c"])
    answers = ["left", "right", f"{plugins.HANG} left", "left", "right"]
    items = [item(f"</think><answer>{a}</answer>") for a in answers]
    pool = RewardPool(cfg, slack_s=2.0)
    try:
        out = grade_within(pool, items, 45)
        after = grade_within(pool, items[:2], 20)  # the pool still works after the kills
    finally:
        pool.shutdown()
    totals = [r["total"] for r in out.results]
    assert totals == [2.75, 1.75, 0.0, 2.75, 1.75]  # the others keep their real grades, in order
    hung = out.results[2]
    assert hung["timed_out"] and hung["hangs_c"] == 0 and hung["format"] == 0
    assert out.timeouts == 1 and out.errors == 0
    assert out.restarts == 2  # the chunk's deadline, then the hung item's own
    assert [r["total"] for r in after.results] == [2.75, 1.75]
    assert (after.timeouts, after.restarts) == (0, 0)


def test_actor_crash_is_retried_then_graded_item_by_item():
    cfg = make_cfg(plugins=["crashes"])
    answers = ["left", f"{plugins.CRASH} left", "right"]
    items = [item(f"</think><answer>{a}</answer>") for a in answers]
    pool = RewardPool(cfg)
    try:
        out = grade_within(pool, items, 60)
    finally:
        pool.shutdown()
    assert [r["total"] for r in out.results] == [3.0, 0.0, 2.0]
    crashed = out.results[1]
    assert "crashed reward worker 0" in crashed["error"] and not crashed["timed_out"]
    assert (out.errors, out.timeouts) == (1, 0) and out.first_error == crashed["error"]
    assert out.restarts == 3  # the chunk, its one retry, then the crashing item alone


def wait_until_gone(actor, instance, seconds=30):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if ray.get(actor.ping.remote(), timeout=seconds) != instance:
                return
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"killed actor instance {instance} still answers after {seconds}s")


def test_killed_actor_restarts_on_next_call():
    cfg = make_cfg(num_workers=2, plugins=["always_one"])
    items = builtin_items()[:8]
    pool = RewardPool(cfg)
    try:
        first = pool.grade(items)
        killed = ray.get(pool.actors[0].ping.remote())
        ray.kill(pool.actors[0], no_restart=False)
        wait_until_gone(pool.actors[0], killed)  # else the next call may still reach the old instance
        second = pool.grade(items)
    finally:
        pool.shutdown()
    assert first.restarts == 0 and second.restarts == 1
    assert second.results == first.results
    assert (second.timeouts, second.errors) == (0, 0)


def test_plugin_that_cannot_be_imported_fails_the_pool_at_start():
    cfg = Config.model_validate({"reward": {"plugins": [{"name": "x", "function": "no_such_module_xyz:f"}]}})
    with pytest.raises(RuntimeError, match="no_such_module_xyz"):
        RewardPool(cfg, startup_timeout_s=60)


def test_count_outcomes():
    results = [
        {"timed_out": False, "error": None},
        {"timed_out": True, "error": "first"},
        {"timed_out": True, "error": None},
        {"timed_out": False, "error": "second"},
    ]
    assert count_outcomes(results) == (2, 2, "first")
    assert count_outcomes([]) == (0, 0, None)
