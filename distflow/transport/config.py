"""``transport.*`` config keys: the data plane's timeouts, flow control and buffers."""
from __future__ import annotations

from dataclasses import dataclass


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
