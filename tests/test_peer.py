"""The data plane of one rank, with peers as threads over real loopback sockets."""
import threading
import time

import pytest
import torch

from distflow.config import TransportConfig
from distflow.transport.liveness import PeerFailure
from distflow.transport.peer import Peer, TransportTimeout, local_id, pick_endpoint
from distflow.transport.wire import Message

pytestmark = pytest.mark.timeout(60)


def _mesh(n, **cfg):
    cfg = TransportConfig(**{"heartbeat_s": 0.05, "peer_timeout_s": 1.0, **cfg})
    peers = [Peer(r, n, "127.0.0.1", cfg) for r in range(n)]
    eps = {p.rank: p.endpoints for p in peers}
    for p in peers:
        p.connect(eps)
    return peers


def _close(peers):
    for p in peers:
        p.liveness.update(state="done")
    for p in peers:
        p.close(failed=True)


def test_messages_arrive_by_key_whatever_the_order():
    a, b = _mesh(2)
    try:
        for step in (2, 0, 1):
            a.send(1, Message(0, "data", (step, "e"), {"s": step}, {"x": torch.full((3,), step)}))
        for step in (0, 1, 2):
            m = b.recv("data", (step, "e"), [0])[0]
            assert m.meta == {"s": step} and torch.equal(m.tensors["x"], torch.full((3,), step))
        a.send(0, Message(0, "self", (0,), None, {"y": torch.arange(4)}))  # to itself: no socket
        assert torch.equal(a.recv("self", (0,), [0])[0].tensors["y"], torch.arange(4))
    finally:
        _close([a, b])


def test_producer_waits_for_slow_consumer_window():
    a, b = _mesh(2, window=2)
    sent = []
    try:
        def produce():
            for step in range(5):
                a.send(1, Message(0, "data", (step,), None, {}), step=step)
                sent.append(step)

        t = threading.Thread(target=produce)
        t.start()
        time.sleep(0.5)
        assert sent == [0, 1], "producer ran past the window of a consumer at step 0"
        b.liveness.update(progress=0)
        deadline = time.monotonic() + 5  # the new progress travels by heartbeat
        while len(sent) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert sent == [0, 1, 2]
        b.liveness.update(progress=2)
        t.join(5)
        assert sent == [0, 1, 2, 3, 4]
        assert len(b.recv("data", (4,), [0])) == 1
    finally:
        _close([a, b])


def test_silent_peer_becomes_an_error_naming_it_within_the_timeout():
    a, b, c = _mesh(3)
    try:
        b.liveness.update(stage="rollout", step=7)
        time.sleep(0.2)
        b.liveness.stop()  # rank 1 goes silent without saying goodbye
        t0 = time.monotonic()
        with pytest.raises(PeerFailure, match=r"peer rank 1 \(last reported stage rollout, step 7\)"):
            a.recv("data", (0,), [2])
        assert time.monotonic() - t0 < 1.0 + 1.0
        with pytest.raises(PeerFailure, match="peer rank 1"):
            c.recv("data", (0,), [0])
    finally:
        _close([a, c])
        b.close(failed=True)


def test_failed_peer_reason_reaches_everyone():
    a, b = _mesh(2)
    try:
        b.liveness.update(state="failed", stage="reward", step=3, reason="ValueError: bad")
        with pytest.raises(PeerFailure, match=r"peer rank 1 \(stage reward, step 3\) failed: ValueError: bad"):
            a.recv("data", (0,), [1])
    finally:
        _close([a, b])


def test_receive_from_live_but_silent_peer_times_out():
    a, b = _mesh(2, recv_timeout_s=0.3)
    try:
        with pytest.raises(TransportTimeout, match=r"from ranks \[1\]"):
            a.recv("data", (0,), [1])
    finally:
        _close([a, b])


def test_oversized_message_is_refused_by_the_sender():
    a, b = _mesh(2, max_message_mb=0.001)
    try:
        with pytest.raises(ValueError, match="over transport.max_message_mb"):
            a.send(1, Message(0, "data", (0,), None, {"x": torch.zeros(1000)}))
    finally:
        _close([a, b])


def test_done_peer_is_not_presumed_dead():
    a, b = _mesh(2)
    try:
        b.liveness.update(state="done")
        time.sleep(0.2)
        b.liveness.stop()
        time.sleep(1.5)  # longer than peer_timeout_s
        a.liveness.check()
    finally:
        a.close(failed=True)
        b.close(failed=True)


@pytest.mark.skipif(not local_id(),
                    reason="abstract Unix sockets need Linux")
def test_local_peers_use_the_unix_socket_and_others_tcp():
    a, b = _mesh(2)
    try:
        assert a._data_endpoints[1].startswith("ipc://@") and a._data_endpoints[1] == b.ipc_endpoint
        a.send(1, Message(0, "data", (0,), None, {"x": torch.arange(5)}))
        assert torch.equal(b.recv("data", (0,), [0])[0].tensors["x"], torch.arange(5))
        # Another machine or network namespace (different local id), or none known: TCP.
        assert pick_endpoint(a.local_id, {**b.endpoints, "local_id": "other-boot/1"}) == b.endpoint
        assert pick_endpoint("", b.endpoints) == b.endpoint and b.endpoint.startswith("tcp://")
    finally:
        _close([a, b])
    c, d = _mesh(2, ipc=False)
    try:
        assert c._data_endpoints[1] == d.endpoint and d.endpoint.startswith("tcp://")
        assert not d.ipc_endpoint
    finally:
        _close([c, d])
