"""The allocator and collector tuning: which calls are made, and that the user's settings win."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest

from batchpipe import memory


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch: pytest.MonkeyPatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    return fake


def test_thresholds_are_fixed(libc: FakeLibc) -> None:
    memory.tune_allocator()
    assert libc.calls == [("mallopt", -3, 131072), ("mallopt", -1, 131072)]


def test_thresholds_from_the_environment_are_left_alone(
    libc: FakeLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    memory.tune_allocator()
    assert libc.calls == [("mallopt", -1, 131072)]


def test_release_trims_the_heap(libc: FakeLibc) -> None:
    memory.release_free_memory()
    assert libc.calls == [("malloc_trim", 0)]


def test_the_real_libc_accepts_the_calls() -> None:
    # On this (glibc) machine the real functions are found and succeed.
    libc = memory._glibc()
    if libc is None:
        pytest.skip("not glibc")
    memory.tune_allocator()
    memory.release_free_memory()
    assert libc.mallopt(-3, 128 * 1024) == 1


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("restore_gc")
def test_collector_runs_less_often_and_skips_start_up_objects() -> None:
    _, gen1, gen2 = gc.get_threshold()
    memory.tune_collector()
    assert gc.get_threshold() == (50_000, gen1, gen2)
    assert gc.get_freeze_count() > 0
