from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from engine.block_manager import BlockManager


def test_tables_cover_tokens_and_free_returns_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("a", 8) == [0, 1]
    assert bm.allocate("a", 9) == [0, 1, 2]
    assert bm.allocate("b", 1) == [3]
    assert bm.num_used == 4
    bm.free("a")
    bm.free("a")  # freeing twice is a no-op, never a double free
    assert bm.num_used == 1
    bm.check_invariants()


def test_allocation_beyond_capacity_raises_without_leaking():
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", 4)
    assert not bm.can_allocate(4, "b")
    with pytest.raises(MemoryError):
        bm.allocate("b", 4)
    assert bm.num_used == 2 + len(bm.table("b"))
    bm.free("b")
    bm.free("a")
    assert bm.num_used == 0


ops = st.lists(st.tuples(st.sampled_from(["grow", "free"]), st.integers(0, 7), st.integers(1, 40)), max_size=200)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_random_operations_conserve_blocks(operations):
    bm = BlockManager(num_blocks=16, block_size=4)
    sizes: dict[str, int] = {}
    for op, seq, tokens in operations:
        name = f"s{seq}"
        if op == "grow":
            want = sizes.get(name, 0) + tokens
            if bm.can_allocate(want, name):
                bm.allocate(name, want)
                sizes[name] = want
                assert len(bm.table(name)) == -(-want // 4)
        else:
            bm.free(name)
            sizes.pop(name, None)
        bm.check_invariants()
    for name in list(sizes):
        bm.free(name)
    assert bm.num_free == 16
