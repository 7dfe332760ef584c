"""PeerAllReduce: data-parallel sums over the data plane (ranks as threads, real sockets)."""
import threading
import time

import pytest
import torch

from distflow.runtime.collective import EXTRA_BYTES, MAX_RANKS, PeerAllReduce
from distflow.transport.liveness import PeerFailure
from test_peer import _close, _mesh
from test_prefix import _close as close_to, _model, _train

pytestmark = pytest.mark.timeout(60)


def _on_threads(fns):
    """Run ``fns[r]()`` on a thread per rank; results (or exceptions) by rank."""
    out = [None] * len(fns)

    def run(r):
        try:
            out[r] = fns[r]()
        except Exception as e:  # noqa: BLE001 - handed to the test
            out[r] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_every_member_gets_the_same_bits_summed_in_rank_order():
    peers = _mesh(3)
    g = torch.Generator().manual_seed(0)
    calls = [torch.randn((3, 5, 7), generator=g) * 10 ** torch.randint(-3, 4, (3, 5, 7), generator=g)
             for _ in range(3)]  # per rank; wide magnitudes, so the summation order shows
    shapes = [(5,), (64, 33), (1,)]
    inputs = [[torch.randn(s, generator=g, dtype=torch.float64 if i == 2 else torch.float32)
               for i, s in enumerate(shapes)] for _ in range(3)]
    try:
        reducers = [PeerAllReduce(p, (0, 1, 2), 1 << 20) for p in peers]

        def member(r):
            before = [t.clone() for t in inputs[r]]
            got = [reducers[r].sum(t) for t in inputs[r]] + [reducers[r].sum(calls[r])]
            assert all(torch.equal(a, b) for a, b in zip(before, inputs[r]))  # inputs untouched
            return got
        results = _on_threads([lambda r=r: member(r) for r in range(3)])
        for res in results:
            assert not isinstance(res, Exception), res
        for i in range(len(shapes) + 1):
            xs = [inputs[r][i] if i < len(shapes) else calls[r] for r in range(3)]
            expected = (xs[0] + xs[1]) + xs[2]
            for r in range(3):
                assert torch.equal(results[r][i], expected), (i, r)
    finally:
        _close(peers)


def test_only_small_cpu_tensors_in_small_groups_go_over_the_data_plane():
    peers = _mesh(2)
    try:
        red = PeerAllReduce(peers[0], (0, 1), max_bytes=4096)
        assert red.handles(torch.zeros(1024)) and not red.handles(torch.zeros(1025))
        assert not PeerAllReduce(peers[0], tuple(range(MAX_RANKS + 1)), 1 << 30).handles(torch.zeros(4))
        big = torch.zeros(4 << 20, dtype=torch.uint8)  # two ranks: any size up to the limit
        assert PeerAllReduce(peers[0], (0, 1), 16 << 20).handles(big)
        four = PeerAllReduce(peers[0], (0, 1, 2, 3), 16 << 20)  # 1.5 copies more than a ring
        assert four.handles(big[:EXTRA_BYTES * 4 // 6]) and not four.handles(big[:EXTRA_BYTES * 4 // 6 + 1])
        with pytest.raises(ValueError, match="rank 0 is not in the group"):
            PeerAllReduce(peers[0], (1, 2), 4096)
    finally:
        _close(peers)


def test_a_member_sending_the_wrong_shape_is_named():
    peers = _mesh(2)
    try:
        reducers = [PeerAllReduce(p, (0, 1), 1 << 20) for p in peers]
        res = _on_threads([lambda: reducers[0].sum(torch.zeros(4)), lambda: reducers[1].sum(torch.zeros(5))])
        assert all(isinstance(e, ValueError) for e in res)
        assert "rank 1 sent ((5,), torch.float32), expected ((4,), torch.float32)" in str(res[0])
    finally:
        _close(peers)


def test_a_dead_member_is_an_error_naming_it_not_a_hang():
    a, b, c = _mesh(3)
    try:
        b.liveness.update(stage="update_actor", step=3)
        time.sleep(0.2)
        b.liveness.stop()  # rank 1 dies silently before its part of the sum
        t0 = time.monotonic()
        res = _on_threads([lambda: PeerAllReduce(a, (0, 1, 2), 1 << 20).sum(torch.ones(3)),
                           lambda: PeerAllReduce(c, (0, 1, 2), 1 << 20).sum(torch.ones(3))])
        assert time.monotonic() - t0 < 5
        for e in res:
            assert isinstance(e, PeerFailure) and "peer rank 1" in str(e) and "update_actor" in str(e)
    finally:
        _close([a, c])


@pytest.mark.parametrize("n_local", [3, 0])  # uneven shards; a rank with no samples
def test_a_data_parallel_step_over_the_data_plane_equals_one_process(n_local):
    peers = _mesh(2)
    try:
        reducers = [PeerAllReduce(p, (0, 1), 1 << 20) for p in peers]
        models = [_model(7), _model(7)]  # here: the global RNG is not for threads
        res = _on_threads([lambda r=r: _train(2, r, True, n_local, reducer=reducers[r], model=models[r])
                           for r in range(2)])
    finally:
        _close(peers)
    ref_grads, ref, ref_stats = _train(1, 0, by_stat=False, n_local=8)
    for grads, params, stats in res:
        assert stats["tokens"] == ref_stats["tokens"]
        assert abs(stats["nll"] - ref_stats["nll"]) < 1e-5 * abs(ref_stats["nll"])
        close_to(grads, ref_grads, params, ref)
    for x, y in zip(res[0][1], res[1][1]):
        assert torch.equal(x, y)  # the replicas hold the same bits
