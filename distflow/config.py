"""Run configuration: ``key=value`` arguments resolved against typed defaults.

Resolution order: command line > the pipeline's ``defaults`` > the defaults below.
Keys of the pipeline's own ``params`` are accepted too. An unknown key or a value of the
wrong type fails before any process opens a socket.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distflow.dag import Pipeline
from distflow.memory import MemoryConfig


class ConfigError(ValueError):
    """A config key or value is wrong."""


@dataclass(kw_only=True)
class TransportConfig:
    heartbeat_s: float = 0.5
    peer_timeout_s: float = 10.0
    """A peer silent this long is presumed dead; every survivor then fails."""
    recv_timeout_s: float = 900.0
    """Backstop for a single receive from live peers (a stage slower than this fails)."""
    window: int = 2
    """Flow control: a producer may run at most this many iterations ahead of a consumer."""
    max_message_mb: float = 2048.0
    ipc: bool = True
    """Peers in the same network namespace of one machine talk over an abstract Unix
    socket instead of TCP loopback (Linux); false: TCP everywhere."""
    keep_large_buffers: bool = True
    """glibc: serve large receive buffers from the heap and reuse them instead of a fresh,
    page-faulting mmap per message (2.5x at 64 MiB; see distflow/transport/heap.py)."""
    peer_all_reduce_mb: float = 16.0
    """Data-parallel sums (gradients) of CPU tensors up to this size go over the data plane
    instead of gloo, in groups of 2 ranks, and of more (up to 8) while that sends at most
    1 MiB more than a ring would (distflow/runtime/collective.py); 0: off."""

    def __post_init__(self):
        if not 0 < self.heartbeat_s < self.peer_timeout_s:
            raise ConfigError(f"need 0 < transport.heartbeat_s ({self.heartbeat_s}) < "
                              f"transport.peer_timeout_s ({self.peer_timeout_s})")
        if self.window < 1:
            raise ConfigError(f"transport.window must be >= 1, got {self.window}")
        if self.recv_timeout_s <= 0 or self.max_message_mb <= 0:
            raise ConfigError("transport.recv_timeout_s and transport.max_message_mb must be > 0")
        if self.peer_all_reduce_mb < 0:
            raise ConfigError(f"transport.peer_all_reduce_mb must be >= 0, got {self.peer_all_reduce_mb}")


@dataclass(kw_only=True)
class FaultConfig:
    """Failure injection (a test tool): at ``step`` before ``stage``, ``rank`` dies."""

    rank: int = -1
    step: int = -1
    stage: str = ""
    mode: str = "kill"  # kill (SIGKILL, no goodbye) | raise (an exception in the stage)

    def __post_init__(self):
        if self.mode not in ("kill", "raise"):
            raise ConfigError(f"fault.mode must be 'kill' or 'raise', got {self.mode!r}")


@dataclass(kw_only=True)
class DiLoCoRunConfig:
    """Low-communication sync between islands of one trainer group (``diloco.*`` keys);
    see ``distflow.diloco`` for the algorithm and ``DiLoCoConfig`` for the checks."""

    mode: str = "ddp"  # ddp | diloco | streaming
    group: str = ""
    """The worker group split into islands (default: the only group that trains)."""
    islands: int = 1
    inner_steps: int = 30
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    fragments: int = 1
    overlap_steps: int = 0
    alpha: float = 0.0
    quantize: str = "fp32"

    def algorithm_config(self):
        from distflow.diloco import DiLoCoConfig
        return DiLoCoConfig(mode=self.mode, inner_steps=self.inner_steps, outer_lr=self.outer_lr,
                            outer_momentum=self.outer_momentum, num_fragments=self.fragments,
                            overlap_steps=self.overlap_steps, alpha=self.alpha,
                            quantize=self.quantize)

    def __post_init__(self):
        if self.islands < 1:
            raise ConfigError(f"diloco.islands must be >= 1, got {self.islands}")
        if self.mode != "ddp":
            self.algorithm_config()  # raises ValueError naming the numbers


@dataclass(kw_only=True)
class RunConfig:
    steps: int = 10
    out: str = ""
    seed: int = 0
    placement: str = "colocated"
    groups: dict[str, Any] = field(default_factory=dict)
    routing: str = "p2p"
    """``p2p`` (peer-to-peer, the point of distflow) or ``hub``: every edge through rank 0,
    the single-controller shape, kept as a baseline for benchmarks."""
    max_staleness: int = 0
    """Disaggregated placement: a rollout may use weights this many updates old
    (0: on-policy, no overlap; 1: generation of step k+1 overlaps training of step k)."""
    verify_weights: bool = False
    """Record a sha256 of the weights on both sides of every sync (weights/ in ``out``)."""
    save_every: int = 0
    """Checkpoint every this many steps (0: only after the last step)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in ``out``."""
    logger: str = ""
    """Besides metrics.jsonl: ``tensorboard``, ``wandb`` or both, comma-separated
    (``distflow.loggers``)."""
    transport: TransportConfig = field(default_factory=TransportConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    diloco: DiLoCoRunConfig = field(default_factory=DiLoCoRunConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.max_staleness < 0:
            raise ConfigError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.transport.window <= self.max_staleness:
            raise ConfigError(f"transport.window={self.transport.window} must exceed "
                              f"max_staleness={self.max_staleness}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        try:
            from distflow.loggers import parse
            parse(self.logger)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.routing not in ("p2p", "hub"):
            raise ConfigError(f"routing must be 'p2p' or 'hub', got {self.routing!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str) or isinstance(default, str):
        return raw
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r}: expected {type(default).__name__}") from None
    return raw


def _group_size(raw: Any) -> Any:
    return int(raw) if isinstance(raw, str) and raw.lstrip("-").isdigit() else raw


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for a in args:
        key, sep, value = (part.strip() for part in a.partition("="))
        if not sep or not key:
            raise ConfigError(f"argument {a!r} is not key=value")
        out[key] = value
    return out


def resolve(pipeline: Pipeline, overrides: dict[str, Any]) -> RunConfig:
    """The run config for ``pipeline`` with ``overrides`` (flat dotted keys) applied."""
    merged = {**pipeline.defaults, **overrides}
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    kwargs: dict[str, Any] = {"groups": {}, "params": dict(pipeline.params)}
    sections = {"transport": TransportConfig, "fault": FaultConfig, "diloco": DiLoCoRunConfig,
                "memory": MemoryConfig}
    nested: dict[str, dict] = {name: {} for name in sections}
    for key, raw in merged.items():
        head, _, tail = key.partition(".")
        if head == "groups" and tail:
            kwargs["groups"][tail] = _group_size(raw)
        elif head in nested and tail:
            cls = sections[head]
            fields = {f.name: f.default for f in dataclasses.fields(cls)}
            if tail not in fields:
                raise ConfigError(f"unknown key {key!r}; {head}.* keys: {sorted(fields)}")
            nested[head][tail] = _coerce(key, raw, fields[tail])
        elif key in pipeline.params:
            kwargs["params"][key] = _coerce(key, raw, pipeline.params[key])
        elif key in top and key not in ("groups", "params", *sections):
            kwargs[key] = _coerce(key, raw, top[key].default)
        else:
            known = sorted([k for k in top if k not in ("groups", "params", *sections)]
                           + list(pipeline.params))
            raise ConfigError(f"unknown config key {key!r} for pipeline {pipeline.name!r}; "
                              f"known: {known}, groups.<name>, transport.*, fault.*, diloco.*, "
                              "memory.*")
    return RunConfig(**kwargs, **{name: cls(**nested[name]) for name, cls in sections.items()})
