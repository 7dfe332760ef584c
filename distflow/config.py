"""Run configuration: ``key=value`` arguments resolved against typed defaults.

Resolution order: command line > the pipeline's ``defaults`` > the defaults below.
Each section lives with the code that reads it: ``transport.*`` in
``distflow.transport.config``, ``memory.*`` in ``distflow.memory``, ``diloco.*`` in
``distflow.diloco``; ``fault.*`` (read by the worker) and the top-level keys are here.
Keys of the pipeline's own ``params`` are accepted too. An unknown key or a value of the
wrong type fails before any process opens a socket.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distflow.dag import Pipeline
from distflow.diloco import DiLoCoConfig
from distflow.memory import MemoryConfig
from distflow.transport.config import ConfigError, TransportConfig

__all__ = ["ConfigError", "FaultConfig", "RunConfig", "TransportConfig", "parse_overrides", "resolve"]


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
    transport: TransportConfig = field(default_factory=TransportConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
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
    sections = {"transport": TransportConfig, "fault": FaultConfig, "diloco": DiLoCoConfig,
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
