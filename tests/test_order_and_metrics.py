import pytest

from visualthinker_ray.data.order import DataOrder
from visualthinker_ray.metrics import rollout_metrics


def take(order, n):
    return [order.next_batch() for _ in range(n)]


def test_every_item_once_per_epoch_with_a_partial_last_batch():
    order = DataOrder(10, 4, seed=3)
    batches = take(order, 6)  # 3 batches per epoch (4 + 4 + 2), two epochs
    assert [len(b) for _, b in batches] == [4, 4, 2, 4, 4, 2]
    assert [e for e, _ in batches] == [0, 0, 0, 1, 1, 1]
    for epoch in (0, 1):
        items = [i for e, b in batches if e == epoch for i in b]
        assert sorted(items) == list(range(10))
    first = [i for e, b in batches if e == 0 for i in b]
    second = [i for e, b in batches if e == 1 for i in b]
    assert first != second  # a new permutation each epoch


def test_resume_replays_the_uninterrupted_order_across_epoch_boundaries():
    straight = take(DataOrder(10, 4, seed=1), 8)
    for cut in range(1, 8):  # cut 3 is exactly at the epoch boundary
        a = DataOrder(10, 4, seed=1)
        before = take(a, cut)
        b = DataOrder(10, 4, seed=1)
        b.load_state_dict(a.state_dict())
        assert before + take(b, 8 - cut) == straight, f"resume after {cut} batches diverged"


def test_order_depends_on_seed_and_checks_resume_compatibility():
    assert take(DataOrder(20, 5, seed=0), 1) != take(DataOrder(20, 5, seed=1), 1)
    state = DataOrder(20, 5, seed=0).state_dict()
    with pytest.raises(ValueError, match="same data and data.seed"):
        DataOrder(21, 5, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="empty"):
        DataOrder(0, 5)


def test_rollout_metrics():
    scores = [
        {"format": 1.0, "accuracy": 1.0, "total": 2.0},
        {"format": 1.0, "accuracy": 0.0, "total": 1.0},
        {"format": 0.0, "accuracy": 1.0, "total": 1.0},
        {"format": 0.0, "accuracy": 0.0, "total": 0.0},
    ]
    m = rollout_metrics(
        ["count", "count", "color", "color"],
        [10, 20, 30, 40],
        [False, False, True, False],
        scores,
        [True, False, False, False],
    )
    assert m["reward/total"] == 1.0 and m["reward/format"] == 0.5 and m["reward/accuracy"] == 0.5
    assert m["accuracy_by_type/count"] == 0.5 and m["accuracy_by_type/color"] == 0.5
    assert (
        m["response_length/mean"] == 25.0
        and m["response_length/max"] == 40.0
        and m["response_length/min"] == 10.0
    )
    assert m["response/truncated_frac"] == 0.25
    assert m["response/self_reflection_rate"] == 0.25
    assert rollout_metrics([], [], [], [], []) == {}
