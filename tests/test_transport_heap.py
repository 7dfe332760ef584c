"""Large receives reuse heap memory instead of a fresh, page-faulting mapping each."""
import multiprocessing as mp
import platform
import resource

import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")]

MSG = 40 << 20  # above glibc's largest mmap threshold (32 MiB)


def _faults_per_message(keep: bool, out) -> None:
    import torch

    from distflow.config import TransportConfig
    from distflow.transport.peer import Peer
    from distflow.transport.wire import Message
    cfg = TransportConfig(keep_large_buffers=keep)
    a, b = Peer(0, 2, "127.0.0.1", cfg), Peer(1, 2, "127.0.0.1", cfg)
    eps = {0: a.endpoints, 1: b.endpoints}
    a.connect(eps)
    b.connect(eps)
    x = torch.arange(MSG // 4, dtype=torch.float32)
    faults = []
    for i in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a.send(1, Message(0, "big", (i,), None, {"x": x}))
        y = b.recv("big", (i,), [0])[0].tensors["x"]
        assert torch.equal(y[-3:], x[-3:])
        del y
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for p in (a, b):
        p.liveness.update(state="done")
        p.close(failed=True)
    out.put(faults)


def _run(keep: bool) -> list[int]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_faults_per_message, args=(keep, q))
    p.start()
    faults = q.get(timeout=100)
    p.join(10)
    return faults


def test_large_receive_buffers_are_reused():
    pages = MSG // resource.getpagesize()
    kept, fresh = _run(True), _run(False)
    # After the first message the kept buffers are already mapped: far fewer faults
    # than one per page, which is what a fresh mapping per message costs.
    assert max(kept[1:]) < pages // 8, (kept, pages)
    assert min(fresh[1:]) > pages // 2, (fresh, pages)
