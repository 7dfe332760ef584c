"""Start-up only: find the peers. After this the torch.distributed store is not used.

The same code runs under ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, ...) and
under plain ``python`` (one process, world size 1).
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str

    @staticmethod
    def from_environ() -> "DistEnv":
        if "RANK" not in os.environ:  # plain `python`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        env = os.environ
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"))


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bind_host(master_addr: str) -> str:
    """The local address on the interface that reaches the rendezvous host."""
    if os.environ.get("DISTFLOW_HOST"):
        return os.environ["DISTFLOW_HOST"]
    addr = socket.gethostbyname(master_addr)
    if ipaddress.ip_address(addr).is_loopback:
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))  # UDP connect sends nothing; it only picks the route
        return s.getsockname()[0]


def init_collectives(env: DistEnv, timeout_s: float = 300.0) -> None:
    """The default process group (gloo) for gradient all-reduce and friends."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size,
                                timeout=timedelta(seconds=timeout_s))


def exchange_endpoints(rank: int, world_size: int, mine: dict[str, str]) -> dict[int, dict[str, str]]:
    """Publish this rank's ZeroMQ endpoints in the store and read every peer's."""
    store = dist.distributed_c10d._get_default_store()
    store.set(f"distflow/endpoints/{rank}", json.dumps(mine))
    keys = [f"distflow/endpoints/{r}" for r in range(world_size)]
    store.wait(keys)
    return {r: json.loads(store.get(k)) for r, k in enumerate(keys)}


def new_process_groups(placement, islands=None, weight_sync=None) -> dict[str, object]:
    """torch.distributed groups, created in the same order on every rank (a collective).

    One per worker group (groups with the same ranks share one; the whole world uses the
    default group). With DiLoCo ``islands``, also one per island (``island/<i>``: its
    gradient all-reduce) and one per position across islands (``outer/<j>``: the
    pseudo-gradient exchange). With disaggregated placement, ``weights``: the trainer
    source and the rollout ranks (the weight broadcast).
    """
    wanted = {name: placement.groups[name] for name in sorted(placement.groups)}
    if islands is not None:
        for i, members in enumerate(islands.members):
            wanted[f"island/{i}"] = members
        for j in range(len(islands.members[0])):
            wanted[f"outer/{j}"] = tuple(m[j] for m in islands.members)
    if weight_sync is not None:
        wanted["weights"] = tuple(sorted(weight_sync))
    by_ranks: dict[tuple[int, ...], object] = {tuple(range(placement.world_size)): dist.group.WORLD}
    for ranks in wanted.values():
        if ranks not in by_ranks:
            by_ranks[ranks] = dist.new_group(list(ranks))
    return {name: by_ranks[ranks] for name, ranks in wanted.items()}
