"""Start-up only: find the peers. After this the torch.distributed store is not used.

The same code runs under ``torchrun`` (which sets RANK, WORLD_SIZE, MASTER_ADDR, ...) and
under plain ``python`` (one process, world size 1). Unless torchrun's agent shares its own
store with the workers (its default; ``distflow run`` turns that off), rank 0 hosts the
store, listening only on the interface that reaches ``MASTER_ADDR``.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from distflow.transport.auth import SECRET_ENV, configured_secret

log = logging.getLogger("distflow.rendezvous")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @staticmethod
    def from_environ() -> "DistEnv":
        if "RANK" not in os.environ:  # plain `python`: one process
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        env = os.environ
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))


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
        dist.init_process_group("gloo", store=_attempt_store(env, timeout_s), rank=env.rank,
                                world_size=env.world_size, timeout=timedelta(seconds=timeout_s))


def _attempt_store(env: DistEnv, timeout_s: float) -> dist.Store:
    """The run's store, under a prefix of this attempt: after an elastic restart the
    agent's store still holds the previous attempt's keys (gloo addresses, our endpoints),
    and reading those would connect to processes that no longer exist."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"distflow/attempt{attempt}/", _store(env, timeout_s))


def _store(env: DistEnv, timeout_s: float) -> dist.Store:
    """torchrun's agent store when it shares one, else a TCPStore that rank 0 hosts on
    the rendezvous interface only (torch's own listens on every interface)."""
    timeout = timedelta(seconds=timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        return store
    if env.rank != 0:
        return dist.TCPStore(env.master_addr, env.master_port, env.world_size, False,
                             timeout=timeout)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind_host(env.master_addr), env.master_port))
    sock.listen(1024)
    return dist.TCPStore(env.master_addr, env.master_port, env.world_size, True,
                         timeout=timeout, wait_for_workers=False, master_listen_fd=sock.detach())


def run_secret(transport_cfg, env: DistEnv) -> bytes:
    """The secret every data-plane connection authenticates with: ``DISTFLOW_SECRET`` or
    ``transport.secret_file`` (``distflow run`` makes one per run). With neither, rank 0
    makes one up and hands it out through the store, which anyone who can reach the store
    during start-up could read; ``forget_secret`` deletes it once every rank has it."""
    if os.environ.get(SECRET_ENV) or transport_cfg.secret_file:
        return configured_secret(transport_cfg)
    if env.world_size == 1:
        return secrets.token_bytes(32)  # no one to talk to
    store = dist.distributed_c10d._get_default_store()
    if env.rank == 0:
        log.warning("no %s or transport.secret_file: the data plane authenticates with a "
                    "secret handed out through torchrun's store at %s:%d, readable by anyone "
                    "who reaches it during start-up; set %s on every node to close that gap",
                    SECRET_ENV, env.master_addr, env.master_port, SECRET_ENV)
        store.set(_secret_key(), secrets.token_hex(32))
    return store.get(_secret_key())


def forget_secret(env: DistEnv) -> None:
    """Rank 0, after every rank has published its endpoints (so has read the secret)."""
    if env.rank == 0 and env.world_size > 1 and dist.is_initialized():
        dist.distributed_c10d._get_default_store().delete_key(_secret_key())


def _secret_key() -> str:  # one per restart: a stale secret is never read
    return f"distflow/secret/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


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
