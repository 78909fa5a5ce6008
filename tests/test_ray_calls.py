"""The pure helpers of ray_calls.py."""

from hypothesis import given
from hypothesis import strategies as st

from visualthinker_ray.ray_calls import split_evenly


@given(st.integers(0, 50), st.integers(1, 8))
def test_split_evenly_covers_in_order_and_balances(n_items, n_chunks):
    items = [f"item{i}" for i in range(n_items)]
    chunks = split_evenly(items, n_chunks)
    assert len(chunks) == n_chunks
    assert [x for c in chunks for x in c] == items
    assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
    # the larger chunks come first (the first workers take the extra items)
    assert [len(c) for c in chunks] == sorted((len(c) for c in chunks), reverse=True)
