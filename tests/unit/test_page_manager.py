"""The unified pool's bookkeeping: KV blocks and adapter pages from one free list."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.page_manager import PageManager


def test_kv_tables_cover_tokens_and_free_returns_pages():
    pm = PageManager(num_pages=10, block_size=4)
    assert pm.grow("a", 5) == [0, 1]
    assert pm.grow("a", 8) == [0, 1]
    assert pm.grow("a", 9) == [0, 1, 2]
    assert pm.grow("b", 1) == [3]
    pm.free_seq("a")
    pm.free_seq("a")  # a second free is a no-op, never a double free
    assert pm.num_used == 1
    pm.check_invariants()


def test_idle_adapters_are_evicted_for_kv_but_pinned_ones_never():
    pm = PageManager(num_pages=10, block_size=4)
    assert pm.add_adapter("x", 3) is not None
    assert pm.add_adapter("y", 3) is not None
    pm.pin("x")
    pm.grow("s", 4 * 4)  # 4 pages: 4 free, no eviction
    assert pm.is_resident("y")
    pm.grow("s", 4 * 6)  # 2 more: y (idle) goes
    assert not pm.is_resident("y") and pm.is_resident("x")
    assert not pm.can_reserve(2)  # only x's pages would be left, and x is pinned
    with pytest.raises(MemoryError):
        pm.grow("s", 4 * 9)
    with pytest.raises(AssertionError):
        pm.evict_adapter("x")
    pm.unpin("x")
    pm.grow("s", 4 * 9)
    assert not pm.is_resident("x") and pm.num_adapter_evictions == 2
    pm.check_invariants()


def test_lru_order_picks_the_least_recently_used_adapter():
    pm = PageManager(num_pages=6, block_size=1)
    for name in ("a", "b", "c"):
        pm.add_adapter(name, 2)
    pm.touch("a")
    pm.add_adapter("d", 2)
    assert pm.resident_adapters() == ["c", "a", "d"]


ops = st.lists(st.tuples(st.sampled_from(["grow", "free", "add", "pin", "unpin", "evict"]),
                         st.integers(0, 5), st.integers(1, 12)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_operations_conserve_pages(operations):
    pm = PageManager(num_pages=24, block_size=4)
    tokens: dict[str, int] = {}
    pins: dict[str, int] = {}
    for op, i, n in operations:
        seq, adapter = f"s{i}", f"a{i}"
        if op == "grow":
            want = tokens.get(seq, 0) + n
            if pm.reserve(pm.extra_blocks(seq, want)):
                pm.grow(seq, want)
                tokens[seq] = want
                assert len(pm.table(seq)) == -(-want // 4)
        elif op == "free":
            pm.free_seq(seq)
            tokens.pop(seq, None)
        elif op == "add" and not pm.is_resident(adapter):
            pages = pm.add_adapter(adapter, n)
            assert (pages is None) or len(pages) == n
        elif op == "pin" and pm.is_resident(adapter):
            pm.pin(adapter)
            pins[adapter] = pins.get(adapter, 0) + 1
        elif op == "unpin" and pins.get(adapter):
            pm.unpin(adapter)
            pins[adapter] -= 1
        elif op == "evict" and pm.is_resident(adapter) and not pins.get(adapter):
            pm.evict_adapter(adapter)
        # pinned adapters are never evicted by anything
        assert all(pm.is_resident(a) for a, c in pins.items() if c)
        pm.check_invariants()
    for seq in list(tokens):
        pm.free_seq(seq)
    for adapter, count in pins.items():
        for _ in range(count):
            pm.unpin(adapter)
    for adapter in pm.resident_adapters():
        pm.evict_adapter(adapter)
    assert pm.num_free == 24
