"""The allocator and collector tuning: which calls are made, that the user's settings win,
and, on glibc, what they do to a process's resident memory (measured in a fresh process)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
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


# A fresh interpreter per measurement: the allocator's state (its thresholds, its free
# lists) is the thing under test. Sizes come from int() so the compiler cannot fold the
# byte strings into one shared constant.
_PROBE = textwrap.dedent(
    """
    import os, sys
    from batchpipe import memory

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    case = sys.argv[1]
    small, keep, large = int("2000"), int("1000"), int("600000")
    if case in ("release", "keep"):
        # 100 MB of malloc'd strings with a survivor every tenth: freed, they leave holes
        # in the heap that free() alone never hands back.
        blocks, kept = [], []
        for i in range(50_000):
            blocks.append(b"y" * small)
            if i % 10 == 0:
                kept.append(b"k" * keep)
        alive = rss_mib()
        del blocks
        freed = rss_mib()
        if case == "release":
            memory.release_free_memory()
        print(alive, freed, rss_mib())
    else:
        if case == "tuned":
            memory.tune_allocator()
        big = b"z" * (large * 7)
        del big  # freeing a large mmapped block makes glibc raise its mmap threshold
        blocks, kept = [], []
        for _ in range(100):
            blocks.append(b"x" * large)
            kept.append(b"k" * keep)
        alive = rss_mib()
        del blocks
        freed = rss_mib()
        print(alive, freed, freed)
    """
)


# Settings that would change the allocator under test: the probe runs without them.
_ALLOCATOR_ENV = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "PYTHONMALLOC")


def _probe(case: str) -> tuple[float, float, float]:
    """RSS MiB (with the strings alive, after freeing them, after releasing) of one case of
    _PROBE, run in a new interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ALLOCATOR_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, case], capture_output=True, text=True, check=True, env=env
    ).stdout.split()
    return float(out[0]), float(out[1]), float(out[2])


@pytest.fixture
def glibc() -> None:
    if memory._glibc() is None:
        pytest.skip("not glibc")


@pytest.mark.usefixtures("glibc")
def test_release_hands_freed_heap_pages_back() -> None:
    alive, freed, _ = _probe("keep")
    assert alive > 100
    assert alive - freed < 10  # free() alone keeps 100 MB of holes in the heap resident
    alive, freed, released = _probe("release")
    assert freed - released > 50


@pytest.mark.usefixtures("glibc")
def test_fixed_thresholds_keep_large_blocks_out_of_the_heap() -> None:
    alive, freed, _ = _probe("default")
    assert alive > 60
    assert alive - freed < 10  # 60 MB freed, none of it returned: it was heap
    alive, freed, _ = _probe("tuned")
    assert alive - freed > 40  # mmapped blocks go back to the system when freed


_KEYS_PROBE = textwrap.dedent(
    """
    import resource, sys
    from batchpipe.db import ScratchKeys

    n = int(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with ScratchKeys() as keys:
        for start in range(0, n, 10_000):  # as estimate adds them: one list per chunk
            keys.add([(i, f"doc-{i:09d}") for i in range(start, min(n, start + 10_000))])
        keys.add([(n, "doc-000000007")])
        assert keys.duplicates() == [("doc-000000007", [7, n])]
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
)


def _keys_growth_mib(n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _KEYS_PROBE, str(n)], capture_output=True, text=True, check=True
    ).stdout
    return float(out)


@pytest.mark.slow
def test_duplicate_ids_are_found_in_flat_memory() -> None:
    # `estimate` checks ids for duplicates through ScratchKeys (a temporary SQLite file);
    # a million keys held in a Python set would take about 100 MiB.
    small, large = _keys_growth_mib(100_000), _keys_growth_mib(1_000_000)
    assert large < 40
    assert large - small < 8, (small, large)
