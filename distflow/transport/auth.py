"""Who may talk to a rank: ZeroMQ security derived from the run's shared secret.

Every socket that listens (a rank's data ROUTER, its heartbeat PUB) is a ZeroMQ
security *server*; every socket that connects is a *client* that proves which rank it
is. Credentials are derived from the run's secret (``DISTFLOW_SECRET`` or
``transport.secret_file``) and the rank, with HMAC-SHA256, so every member of the run
can compute every rank's credential and no one without the secret can compute any:

- default, authenticated: ZeroMQ PLAIN, user name ``<rank>``, password
  ``HMAC(secret, "distflow plain <rank>")``; the data itself travels in the clear, and
  someone who can read the network between two hosts could replay a password;
- ``transport.encrypt=true``: ZeroMQ CURVE, the rank's key pair derived from
  ``HMAC(secret, "distflow curve <rank>")``; clients also check the server's key, and
  every byte is encrypted (Curve25519 + XSalsa20-Poly1305), at a cost measured in
  benchmarks/RESULTS.md.

One ZAP handler per ZeroMQ context (a thread) checks each handshake and tells libzmq
which rank the connection belongs to; every message received on that connection
carries it as its ``User-Id`` property, which is what a received message's claimed
source is checked against (a client-chosen routing id proves nothing). A handshake is
refused for an unknown user, a wrong password or key, and for the receiving rank's own
identity; refusals are counted in ``denied``.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import threading
from pathlib import Path

import zmq
from zmq.utils import z85

log = logging.getLogger("distflow.transport")

SECRET_ENV = "DISTFLOW_SECRET"
MIN_SECRET_BYTES = 16
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"


class SecretError(ValueError):
    """The run's secret is missing, too short or readable by others."""


def worth_logging(n: int) -> bool:
    """The first 10 of a kind of event, then the 100th, 1000th, ...: a flood of hostile
    traffic must not flood the log (or fill a pipe nobody reads)."""
    return n <= 10 or str(n).rstrip("0") == "1"


def _derive(secret: bytes, what: str, rank: int) -> bytes:
    return hmac.new(secret, f"distflow {what} {rank}".encode(), hashlib.sha256).digest()


class Credentials:
    """Every rank's credentials of one run (from its secret), and how to apply them."""

    def __init__(self, secret: bytes, world_size: int, encrypt: bool = False):
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"the run secret has {len(secret)} bytes; at least "
                              f"{MIN_SECRET_BYTES} are needed")
        self.world_size, self.encrypt = world_size, encrypt
        self._secret = secret
        self._public: dict[bytes, int] = {}
        if encrypt:
            self._public = {self.curve_keys(r)[0]: r for r in range(world_size)}

    def password(self, rank: int) -> bytes:
        return _derive(self._secret, "plain", rank).hex().encode()

    def curve_keys(self, rank: int) -> tuple[bytes, bytes]:
        """(public, secret) Z85 keys of ``rank``."""
        secret_key = z85.encode(_derive(self._secret, "curve", rank))
        return zmq.curve_public(secret_key), secret_key

    def server(self, sock: zmq.Socket, rank: int) -> None:
        """Make ``sock`` (not yet bound) accept only authenticated ranks."""
        sock.setsockopt(zmq.ZAP_DOMAIN, b"distflow")
        if self.encrypt:
            public, secret = self.curve_keys(rank)
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            sock.setsockopt(zmq.PLAIN_SERVER, 1)

    def client(self, sock: zmq.Socket, rank: int, server_rank: int) -> None:
        """Make the next ``connect`` of ``sock`` prove it is ``rank`` (and, encrypted,
        check that the other end is ``server_rank``)."""
        if self.encrypt:
            public, secret = self.curve_keys(rank)
            sock.setsockopt(zmq.CURVE_SERVERKEY, self.curve_keys(server_rank)[0])
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
        else:
            sock.setsockopt(zmq.PLAIN_USERNAME, str(rank).encode())
            sock.setsockopt(zmq.PLAIN_PASSWORD, self.password(rank))

    def identify(self, mechanism: bytes, credentials: list[bytes]) -> int | None:
        """The rank these handshake credentials prove, or None."""
        if self.encrypt:
            if mechanism != b"CURVE" or len(credentials) != 1:
                return None
            return self._public.get(z85.encode(credentials[0]))
        if mechanism != b"PLAIN" or len(credentials) != 2:
            return None
        user, password = credentials
        if not user.isdigit() or len(user) > 6 or not 0 <= int(user) < self.world_size:
            return None
        rank = int(user)
        return rank if hmac.compare_digest(password, self.password(rank)) else None


class ZapHandler:
    """The ZAP handler of one context: admits authenticated peers other than ``rank``."""

    def __init__(self, zctx: zmq.Context, creds: Credentials, rank: int):
        self.creds, self.rank = creds, rank
        self.denied = 0
        self._sock = zctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(_ZAP_ENDPOINT)  # before any server socket binds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distflow-zap", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(50):
                continue
            req = self._sock.recv_multipart()
            try:
                self._sock.send_multipart(self._reply(req))
            except zmq.ZMQError:
                return

    def _reply(self, req: list[bytes]) -> list[bytes]:
        if len(req) < 6:
            self.denied += 1
            return [b"1.0", req[1] if len(req) > 1 else b"", b"400", b"malformed", b"", b""]
        version, request_id, _domain, address, _identity, mechanism, *credentials = req
        rank = self.creds.identify(mechanism, credentials)
        if rank is None or rank == self.rank:
            self.denied += 1
            why = "claims this rank's own identity" if rank == self.rank else \
                "bad credentials (not a member of this run)"
            if worth_logging(self.denied):
                log.warning("rank %d refused a %s connection from %s (%d so far): %s", self.rank,
                            mechanism.decode(errors="replace"), address.decode(errors="replace"),
                            self.denied, why)
            return [b"1.0", request_id, b"400", why.encode(), b"", b""]
        return [b"1.0", request_id, b"200", b"OK", str(rank).encode(), b""]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close(linger=0)


def configured_secret(cfg) -> bytes:
    """The run's secret: ``DISTFLOW_SECRET``, else ``transport.secret_file`` (which must
    not be readable by group or others); SecretError when neither is set."""
    env = os.environ.get(SECRET_ENV, "")
    if env:
        return env.encode()
    path = getattr(cfg, "secret_file", "")
    if not path:
        raise SecretError(f"no run secret: set {SECRET_ENV} (the same on every rank) or "
                          "transport.secret_file")
    try:
        st = os.stat(path)
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise SecretError(f"transport.secret_file={path!r}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise SecretError(f"transport.secret_file={path!r} is readable by group or others "
                          f"(mode {stat.filemode(st.st_mode)}); chmod 600 it")
    return secret
