"""The peer-to-peer data plane of one rank.

Each rank binds one ROUTER socket for everything it receives and opens one DEALER per
peer it sends to (identity ``r<rank>``, so a message's claimed source can be checked).
The ROUTER listens on TCP and, on Linux, also on an abstract-namespace Unix socket; a
peer in the same network namespace of the same boot connects over the Unix socket,
which skips the TCP stack (1.3-2x the loopback throughput, see benchmarks/RESULTS.md),
everyone else over TCP. Abstract sockets live in the network namespace, so peers in
different namespaces (the shaped-link DiLoCo benchmark) always use TCP.
Messages are addressed by ``(kind, key, src)``; a receive waits for exactly the keys
the deterministic plan says will come, stashing early arrivals in a mailbox.

Guarantees:
- no untimed wait: every receive polls in short slices, re-checks liveness (a dead or
  failed peer raises ``PeerFailure`` naming it) and gives up after ``recv_timeout_s``;
- back-pressure: a message for iteration ``k`` is not sent before the consumer has
  finished iteration ``k - window``, so a fast producer can park at most ``window``
  iterations of data in a slow consumer's memory; ZeroMQ high-water marks bound the
  socket queues below that;
- a malformed, truncated, spoofed or oversized message is dropped with a logged reason;
  nothing received is ever unpickled or executed.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Callable

import zmq

from distflow.transport.config import TransportConfig
from distflow.transport.heap import keep_large_buffers
from distflow.transport.liveness import Liveness
from distflow.transport.wire import Limits, Message, WireError, decode, encode

log = logging.getLogger("distflow.transport")

_POLL_MS = 50
_POLLIN = int(zmq.POLLIN)  # plain int: bit tests on the enum cost more than the syscall


class TransportTimeout(TimeoutError):
    pass


def pick_endpoint(local_id: str, peer: dict[str, str]) -> str:
    """The peer's Unix socket when it is reachable from here, else its TCP endpoint."""
    if local_id and peer.get("ipc") and peer.get("local_id") == local_id:
        return peer["ipc"]
    return peer["data"]


def local_id() -> str:
    """Who can reach our abstract Unix socket: same boot, same network namespace
    (empty where either is unknown, i.e. off Linux: TCP only)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return ""


class Peer:
    def __init__(self, rank: int, world_size: int, host: str, cfg: TransportConfig):
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.limits = Limits(max_message_bytes=int(cfg.max_message_mb * (1 << 20)))
        if cfg.keep_large_buffers:  # before the context's I/O thread exists
            keep_large_buffers()
        self._zctx = zmq.Context()
        self._router = self._zctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.RCVHWM, 1000)
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        port = self._router.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self.local_id = local_id() if cfg.ipc else ""
        self.ipc_endpoint = ""
        if self.local_id:
            self.ipc_endpoint = f"ipc://@distflow-{uuid.uuid4().hex}-r{rank}"
            self._router.bind(self.ipc_endpoint)
        self.liveness = Liveness(self._zctx, rank, world_size, host, cfg.heartbeat_s,
                                 cfg.peer_timeout_s)
        self._dealers: dict[int, zmq.Socket] = {}
        self._data_endpoints: dict[int, str] = {}
        self._mailbox: dict[tuple, Message] = {}
        self.bytes_sent = 0

    # -- set-up ---------------------------------------------------------------------
    @property
    def endpoints(self) -> dict[str, str]:
        return {"data": self.endpoint, "heartbeat": self.liveness.endpoint,
                "ipc": self.ipc_endpoint, "local_id": self.local_id}

    def connect(self, peers: dict[int, dict[str, str]]) -> None:
        """Start heartbeats with every peer; data connections open on first send."""
        self._data_endpoints = {r: pick_endpoint(self.local_id, p) for r, p in peers.items()}
        self.liveness.start({r: p["heartbeat"] for r, p in peers.items()})

    def _dealer(self, dst: int) -> zmq.Socket:
        if dst not in self._dealers:
            s = self._zctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, b"r%d" % self.rank)
            s.setsockopt(zmq.SNDHWM, 1000)
            s.setsockopt(zmq.LINGER, int(self.cfg.peer_timeout_s * 1000))
            s.connect(self._data_endpoints[dst])
            self._dealers[dst] = s
        return self._dealers[dst]

    # -- sending ----------------------------------------------------------------------
    def send(self, dst: int, msg: Message, step: int | None = None) -> None:
        """Send ``msg`` to rank ``dst``; for iteration ``step``, wait for its window."""
        if step is not None:
            self._wait_window(dst, step)
        if dst == self.rank:  # to ourselves: no socket, no copy
            self._mailbox[(msg.kind, msg.key, msg.src)] = msg
            return
        frames = encode(msg)
        size = sum(memoryview(f).nbytes for f in frames)
        if size > self.limits.max_message_bytes:
            raise ValueError(f"message {msg.kind} {msg.key} to rank {dst} is {size} bytes, over "
                             f"transport.max_message_mb={self.cfg.max_message_mb}")
        sock = self._dealer(dst)
        deadline = time.monotonic() + self.cfg.recv_timeout_s
        while True:
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # the socket queue is full: the peer is slow or gone
                self._wait_a_little(deadline, lambda: f"sending {msg.kind} {msg.key} to rank {dst}",
                                    writable=sock)
        self.bytes_sent += size

    def _wait_window(self, dst: int, step: int) -> None:
        need = step - self.cfg.window
        if dst == self.rank or self.liveness.progress_of(dst) >= need:
            return
        deadline = time.monotonic() + self.cfg.recv_timeout_s
        with self.liveness.changed:
            while self.liveness.progress_of(dst) < need:
                self.liveness.check()
                if time.monotonic() > deadline:
                    raise TransportTimeout(f"rank {dst} stayed behind iteration {need} for "
                                           f"{self.cfg.recv_timeout_s} s (flow-control window)")
                self.liveness.changed.wait(_POLL_MS / 1000)

    def _wait_a_little(self, deadline: float, what: Callable[[], str],
                       writable: zmq.Socket | None = None) -> None:
        """One poll slice of a wait; ``what()`` (built only on timeout) names the wait."""
        self.liveness.check()
        if time.monotonic() > deadline:
            raise TransportTimeout(f"rank {self.rank}: {what()} timed out after "
                                   f"{self.cfg.recv_timeout_s} s")
        self._pump(_POLL_MS, writable)

    # -- receiving --------------------------------------------------------------------
    def recv(self, kind: str, key: tuple, srcs: list[int]) -> dict[int, Message]:
        """Exactly one message ``(kind, key)`` from each rank in ``srcs``."""
        want = {(kind, tuple(key), s) for s in srcs}
        got: dict[int, Message] = {}
        deadline = time.monotonic() + self.cfg.recv_timeout_s
        while True:
            for k in [k for k in want if k in self._mailbox]:
                got[k[2]] = self._mailbox.pop(k)
                want.discard(k)
            if not want:
                return got
            self._wait_a_little(deadline, lambda: f"waiting for {kind} {tuple(key)} from ranks "
                                                  f"{sorted(k[2] for k in want)}")

    def _pump(self, timeout_ms: int, writable: zmq.Socket | None = None) -> None:
        """Move whatever arrives within ``timeout_ms`` into the mailbox; return early, too,
        once ``writable`` (a send queue that was full) has room again."""
        if writable is None:
            ready = self._router.poll(timeout_ms)
        else:
            poller = zmq.Poller()
            poller.register(self._router, zmq.POLLIN)
            poller.register(writable, zmq.POLLOUT)
            ready = dict(poller.poll(timeout_ms)).get(self._router, 0)
        while ready:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._accept(frames)
            ready = self._router.get(zmq.EVENTS) & _POLLIN  # no exception when drained

    def _accept(self, frames: list) -> None:
        identity = frames[0].bytes
        try:
            msg = decode(frames[1:], self.limits)
            if identity != b"r%d" % msg.src or not 0 <= msg.src < self.world_size:
                raise WireError(f"claims src {msg.src} but came from connection {identity!r:.20}")
            slot = (msg.kind, msg.key, msg.src)
            if slot in self._mailbox:
                raise WireError(f"duplicate message {slot}")
        except WireError as e:
            log.warning("rank %d rejected a message: %s", self.rank, e)
            return
        self._mailbox[slot] = msg

    def close(self, flush_s: float = 0.0, failed: bool = False) -> None:
        """Close sockets; unless ``failed``, queued sends get up to peer_timeout_s to leave."""
        self.liveness.stop(flush_s)
        for s in self._dealers.values():
            s.close(linger=0 if failed else None)
        self._router.close(linger=0)
        self._zctx.term()
