import os

import pytest

from distflow.runtime import affinity
from distflow.runtime.affinity import cpu_slice


def test_cpu_slice_gives_each_local_rank_its_own_cores():
    assert cpu_slice(0, 2, [1, 0]) == [0]
    assert cpu_slice(1, 2, [0, 1]) == [1]
    assert cpu_slice(2, 3, [4, 5, 6, 7, 8, 9, 10]) == [8, 9]  # 7 cores // 3 ranks
    assert cpu_slice(0, 4, [0, 1]) == []  # fewer cores than ranks: not pinned
    assert cpu_slice(0, 1, [0, 1]) == [0, 1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pin_only_when_it_cannot_oversubscribe(monkeypatch):
    before = os.sched_getaffinity(0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert affinity.pin_local_rank(0) == []  # one local rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(len(before) + 1))
    assert affinity.pin_local_rank(0) == []  # more ranks than cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("DISTFLOW_CPU_AFFINITY", "0")
    assert affinity.pin_local_rank(0) == []  # turned off
    assert os.sched_getaffinity(0) == before
