"""``ThreadReducer``: DiLoCo islands as threads of one process, for tests."""
from __future__ import annotations

import threading

import torch

from distflow.diloco import CompletedGather, GatherHandle


class _Rendezvous:
    def __init__(self, num_islands: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.barrier = threading.Barrier(num_islands, timeout=timeout_s)
        self.slots: list[torch.Tensor | None] = [None] * num_islands


class ThreadReducer:
    """Islands as threads of one process (tests): ``ThreadReducer.group(n)`` gives one
    reducer per island. Gathers rendezvous on a barrier; the handle of
    ``start_all_gather`` is already complete."""

    def __init__(self, rendezvous: _Rendezvous, island: int):
        self._rv, self.island = rendezvous, island
        self.num_islands = len(rendezvous.slots)

    @classmethod
    def group(cls, num_islands: int, timeout_s: float = 60.0) -> list["ThreadReducer"]:
        rendezvous = _Rendezvous(num_islands, timeout_s)
        return [cls(rendezvous, i) for i in range(num_islands)]

    def all_gather_bytes(self, payload: torch.Tensor) -> list[torch.Tensor]:
        self._rv.slots[self.island] = payload.detach().clone()
        self._wait()
        out = list(self._rv.slots)  # slots are rebound, never written in place
        self._wait()  # nobody overwrites a slot before every island has read them all
        return out

    def start_all_gather(self, payload: torch.Tensor) -> GatherHandle:
        return CompletedGather(self.all_gather_bytes(payload))

    def abort(self) -> None:
        """Break the barrier so the other islands fail instead of waiting out the timeout."""
        self._rv.barrier.abort()

    def _wait(self) -> None:
        try:
            self._rv.barrier.wait()
        except threading.BrokenBarrierError:
            raise TimeoutError(f"island {self.island}: a peer island failed or did not reach "
                               f"the gather within {self._rv.timeout_s}s") from None
