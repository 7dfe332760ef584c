"""Liveness and progress between peers: a heartbeat thread per rank.

Each rank publishes a small msgpack heartbeat ``{rank, stage, step, progress, state,
reason}`` every ``heartbeat_s`` and at once whenever its progress or state changes (the
main thread wakes the heartbeat thread through an inproc socket, so flow control sees
progress without delay); a change of stage alone rides on the next beat, because every
beat goes to every peer and stages change several times per iteration. It subscribes to
every peer's heartbeats. From them it knows

- which peers are alive: a peer whose heartbeat connection closes before it said
  ``done`` or ``failed`` died (killed by a signal, or crashed) and is named at once; a
  peer silent for ``peer_timeout_s`` (hung, stopped, or unreachable) is presumed dead;
- which peer failed and why: a rank that raises publishes ``state="failed"`` before exit;
- how far each peer has got (``progress`` = last completed iteration), which is what
  flow control between a producer and a slower consumer waits on.

The first failure seen becomes ``failure`` (a one-line reason naming rank and stage),
except that a peer's report of being merely terminated by a signal (its launcher
stopping it) gives way to a root cause seen later; blocking calls of the data plane check
it, and ``on_failure`` (if set) is called once from the heartbeat thread. If the main thread is stuck in user code and
does not exit within ``peer_timeout_s`` of a failure, the watchdog ends the process, so
a dead peer never turns into a hang.
"""
from __future__ import annotations

import os
import sys
import threading
import time

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message


class PeerFailure(RuntimeError):
    """A peer died or failed; the message names its rank and stage."""


_HB_FIELDS = {"rank": int, "stage": str, "step": int, "progress": int, "state": str, "reason": str}


def _parse_heartbeat(raw: bytes, world_size: int) -> dict | None:
    try:
        hb = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=lambda c, d: None)
    except Exception:
        return None
    if not isinstance(hb, dict) or set(hb) != set(_HB_FIELDS):
        return None
    if not all(isinstance(hb[k], t) for k, t in _HB_FIELDS.items()):
        return None
    return hb if 0 <= hb["rank"] < world_size else None


class Liveness:
    def __init__(self, zctx: zmq.Context, rank: int, world_size: int, host: str,
                 heartbeat_s: float, peer_timeout_s: float, creds):
        self.rank, self.world_size = rank, world_size
        self.heartbeat_s, self.peer_timeout_s = heartbeat_s, peer_timeout_s
        self._zctx, self._creds = zctx, creds  # transport.auth.Credentials
        self._pub = zctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        creds.server(self._pub, rank)
        port = self._pub.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._me = {"rank": rank, "stage": "", "step": -1, "progress": -1, "state": "ok", "reason": ""}
        self.peers: dict[int, dict] = {}
        self._last_seen: dict[int, float] = {}
        self.failure: str | None = None
        self._failure_is_echo = False  # a peer only said it was terminated by a signal
        self.on_failure = None  # called once, from the heartbeat thread, with the failure
        self.changed = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # The main thread pokes the heartbeat thread's poll through this pair.
        addr = f"inproc://distflow-liveness-{id(self)}"
        self._wake_rx = zctx.socket(zmq.PULL)
        self._wake_rx.bind(addr)
        self._wake_tx = zctx.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.setsockopt(zmq.SNDHWM, 1)
        self._wake_tx.connect(addr)
        self._thread: threading.Thread | None = None

    # -- called from the main thread -------------------------------------------------
    def start(self, endpoints: dict[int, str]) -> None:
        now = time.monotonic()
        self._sub_endpoints = endpoints
        self._last_seen = {r: now for r in endpoints if r != self.rank}
        self.peers = {r: {"stage": "", "step": -1, "progress": -1, "state": "ok"} for r in self._last_seen}
        self._thread = threading.Thread(target=self._loop, name="distflow-liveness", daemon=True)
        self._thread.start()

    def update(self, **fields) -> None:
        """Change what this rank announces (stage, step, progress, state, reason); a new
        progress or state goes out at once, a new stage/step with the next beat."""
        self._me.update(fields)
        if fields.keys() - {"stage", "step"}:
            self._poke()

    def _poke(self) -> None:
        self._wake.set()
        try:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        except zmq.ZMQError:  # a poke is already pending (or we are closing): enough
            pass

    def check(self) -> None:
        if self.failure:
            raise PeerFailure(self.failure)

    def progress_of(self, rank: int) -> int:
        return self.peers[rank]["progress"] if rank != self.rank else self._me["progress"]

    def stop(self, flush_s: float = 0.0) -> None:
        """Stop heartbeats; wait ``flush_s`` first so a final state reaches the peers."""
        if flush_s:
            self._poke()
            time.sleep(flush_s)
        self._stop.set()
        self._poke()
        if self._thread:
            self._thread.join(timeout=5)
        self._pub.close(linger=0)
        self._wake_tx.close(linger=0)
        if self._thread is None:  # otherwise the heartbeat thread closes it on its way out
            self._wake_rx.close(linger=0)

    # -- the heartbeat thread ---------------------------------------------------------
    def _loop(self) -> None:
        sub = self._zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.MAXMSGSIZE, 4096)
        for r, ep in self._sub_endpoints.items():
            if r != self.rank:
                self._creds.client(sub, self.rank, r)
                sub.connect(ep)
        monitor = sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        by_endpoint = {ep: r for r, ep in self._sub_endpoints.items() if r != self.rank}
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(self._wake_rx, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        failed_at = None
        reported = False
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._wake.is_set() or now >= next_beat:
                self._wake.clear()
                self._pub.send(msgpack.packb(self._me), zmq.NOBLOCK)
                next_beat = now + self.heartbeat_s
            # sleep until the next beat, a poke from the main thread or a peer's beat
            # (at most 50 ms, to check for dead peers), then drain a bounded number:
            # many chatty peers must not starve our own beats
            wait_ms = max(0, int(min(next_beat - now, 0.05) * 1000))
            ready = dict(poller.poll(timeout=wait_ms))
            if self._wake_rx in ready:
                while True:
                    try:
                        self._wake_rx.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
            if sub in ready:
                for _ in range(4 * self.world_size):
                    try:
                        self._receive(sub.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
            if monitor in ready:
                self._disconnected(monitor, by_endpoint)
            self._find_dead(time.monotonic())
            if self.failure and failed_at is None:
                failed_at = time.monotonic()
            if self.failure and not reported and self.on_failure is not None:
                reported = True
                try:
                    self.on_failure(self.failure)
                except Exception as e:  # a report must never kill the heartbeats
                    print(f"distflow: rank {self.rank}: on_failure: {e!r}", file=sys.stderr)
            if failed_at and time.monotonic() - failed_at > self.peer_timeout_s + 5:
                self._watchdog_exit()
        sub.disable_monitor()
        monitor.close(linger=0)
        sub.close(linger=0)
        self._wake_rx.close(linger=0)

    def _receive(self, raw: bytes) -> None:
        hb = _parse_heartbeat(raw, self.world_size)
        if hb is None or hb["rank"] == self.rank:
            return  # a malformed heartbeat is ignored, never trusted
        r = hb["rank"]
        self._last_seen[r] = time.monotonic()
        with self.changed:
            self.peers[r] = hb
            if hb["state"] == "failed":
                echo = hb["reason"].startswith("terminated by SIG")  # no cause of its own
                self._set_failure(f"peer rank {r} (stage {hb['stage'] or '-'!s}, step {hb['step']}) "
                                  f"failed: {hb['reason']}", echo)
            self.changed.notify_all()

    def _set_failure(self, failure: str, echo: bool = False) -> None:
        """Keep the first failure, unless it was only a peer's 'terminated by a signal'."""
        if self.failure is None or (self._failure_is_echo and not echo):
            self.failure, self._failure_is_echo = failure, echo

    def _disconnected(self, monitor, by_endpoint: dict[str, int]) -> None:
        """A peer's heartbeat connection closed: dead, unless it said done or failed."""
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            r = by_endpoint.get(event["endpoint"].decode(errors="replace"))
            if r is None or self.peers[r]["state"] in ("done", "failed"):
                continue
            p = self.peers[r]
            with self.changed:
                self._set_failure(f"peer rank {r} (last reported stage {p['stage'] or '-'}, step {p['step']}) died: "
                                  "its connection closed without a goodbye (killed by a signal, "
                                  "or crashed)")
                self.changed.notify_all()

    def _find_dead(self, now: float) -> None:
        for r, seen in self._last_seen.items():
            if self.failure and not self._failure_is_echo:
                return
            if self.peers[r]["state"] != "done" and now - seen > self.peer_timeout_s:
                p = self.peers[r]
                with self.changed:
                    self._set_failure(f"peer rank {r} (last reported stage {p['stage'] or '-'}, step "
                                      f"{p['step']}) sent no heartbeat for {now - seen:.1f} s "
                                      f"(> transport.peer_timeout_s={self.peer_timeout_s}); hung "
                                      "or unreachable, presumed dead")
                    self.changed.notify_all()

    def _watchdog_exit(self) -> None:
        print(f"distflow: rank {self.rank} stage {self._me['stage'] or '-'}: {self.failure} "
              "(main thread did not stop; exiting)", file=sys.stderr, flush=True)
        os._exit(1)
