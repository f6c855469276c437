"""Link (host <-> device copies and their byte counters) and StagingPair, on CPU."""

from __future__ import annotations

import pytest
import torch

from kvtier.link import Link, StagingPair, nbytes
from kvtier.store import DeviceLedger


def test_nbytes_counts_elements_times_element_size():
    assert nbytes(torch.empty(3, 5, dtype=torch.float32)) == 60
    assert nbytes(torch.empty(3, 5, dtype=torch.float16)) == 30
    assert nbytes(torch.empty(7, dtype=torch.int64)) == 56
    assert nbytes(torch.empty(0, 4)) == 0
    # a view counts only its own elements, not its storage
    assert nbytes(torch.empty(10, 8)[2:5]) == 3 * 8 * 4


def test_cpu_link_is_not_cuda():
    link = Link("cpu")
    assert link.cuda is False
    assert link.device == torch.device("cpu")
    assert link.counters() == {"h2d_bytes": 0, "d2h_bytes": 0}
    assert (link.h2d_copies, link.d2h_copies) == (0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_h2d_and_d2h_copy_and_count_exactly(dtype):
    torch.manual_seed(0)
    link = Link("cpu")
    expected_h2d = expected_d2h = 0
    for i, shape in enumerate([(4, 3), (2, 5, 7), (1,), (6, 2, 2, 3)]):
        src = torch.randn(shape).to(dtype)
        dst = torch.zeros(shape, dtype=dtype)
        assert link.h2d(dst, src, lane=i) is None  # CPU: synchronous, no event
        assert torch.equal(dst, src)
        assert dst.data_ptr() != src.data_ptr()
        expected_h2d += src.numel() * src.element_size()

        back = torch.zeros(shape, dtype=dtype)
        assert link.d2h(back, dst) is None
        assert torch.equal(back, src)
        expected_d2h += src.numel() * src.element_size()

        assert link.h2d_bytes == expected_h2d
        assert link.d2h_bytes == expected_d2h
        assert link.h2d_copies == i + 1
        assert link.d2h_copies == i + 1
    assert link.counters() == {"h2d_bytes": expected_h2d, "d2h_bytes": expected_d2h}


def test_copy_into_a_view_writes_only_the_view():
    link = Link("cpu")
    dst = torch.zeros(4, 6)
    src = torch.arange(12, dtype=torch.float32).view(2, 6)
    link.h2d(dst[1:3], src)
    assert torch.equal(dst[1:3], src)
    assert torch.count_nonzero(dst[0]) == 0 and torch.count_nonzero(dst[3]) == 0
    assert link.h2d_bytes == 12 * 4


def test_wait_and_synchronize_are_noops_on_cpu():
    link = Link("cpu")
    link.wait(None)
    link.synchronize()
    assert link.counters() == {"h2d_bytes": 0, "d2h_bytes": 0}


@pytest.mark.parametrize("direction", ["h2d", "d2h"])
@pytest.mark.parametrize(
    "dst,src",
    [
        (torch.zeros(3, 4), torch.zeros(4, 3)),  # same numel, different shape
        (torch.zeros(3, 4), torch.zeros(3, 5)),
        (torch.zeros(12), torch.zeros(3, 4)),
        (torch.zeros(3, 4, dtype=torch.float16), torch.zeros(3, 4, dtype=torch.float32)),
        (torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.float16)),
    ],
)
def test_mismatched_pairs_raise_and_count_nothing(direction, dst, src):
    link = Link("cpu")
    before = dst.clone()
    with pytest.raises(ValueError, match="mismatched"):
        getattr(link, direction)(dst, src)
    assert link.counters() == {"h2d_bytes": 0, "d2h_bytes": 0}
    assert (link.h2d_copies, link.d2h_copies) == (0, 0)
    assert torch.equal(dst, before)


# -- StagingPair ------------------------------------------------------------------------------------

def test_staging_alternates_buffers():
    sp = StagingPair(torch.device("cpu"), torch.float32)
    indices = [sp.take(8)[0] for _ in range(5)]
    assert indices == [0, 1, 0, 1, 0]
    assert sp.buffers[0] is not None and sp.buffers[1] is not None
    assert sp.buffers[0].data_ptr() != sp.buffers[1].data_ptr()


def test_staging_take_returns_views_of_its_two_buffers():
    sp = StagingPair(torch.device("cpu"), torch.float16)
    i0, a = sp.take(10)
    i1, b = sp.take(10)
    assert (i0, i1) == (0, 1)
    assert a.numel() == 10 and b.numel() == 10
    assert a.dtype == torch.float16 and a.device.type == "cpu"
    assert a.data_ptr() == sp.buffers[0].data_ptr()
    assert b.data_ptr() == sp.buffers[1].data_ptr()
    # writing one does not touch the other
    a.fill_(1.0)
    b.fill_(2.0)
    assert bool((a == 1).all()) and bool((b == 2).all())


def test_staging_honours_avoid():
    sp = StagingPair(torch.device("cpu"), torch.float32)
    assert sp.take(4, avoid=0)[0] == 1
    assert sp.take(4, avoid=0)[0] == 1  # avoid wins over alternation
    assert sp.take(4, avoid=1)[0] == 0
    assert sp.take(4, avoid=1)[0] == 0
    # after avoid=1 handed out buffer 0, plain alternation continues with buffer 1
    assert sp.take(4)[0] == 1
    assert sp.take(4)[0] == 0


def test_staging_grows_and_keeps_buffer_when_big_enough():
    sp = StagingPair(torch.device("cpu"), torch.float32)
    _, a = sp.take(100)
    ptr0 = sp.buffers[0].data_ptr()
    cap0 = sp.buffers[0].numel()
    assert cap0 >= 100
    sp.take(1)  # buffer 1
    _, a2 = sp.take(cap0)  # buffer 0 again, fits: no reallocation
    assert sp.buffers[0].data_ptr() == ptr0
    assert a2.numel() == cap0
    sp.take(1)
    _, a3 = sp.take(cap0 + 1)  # too big: grows
    assert sp.buffers[0].numel() >= cap0 + 1
    assert a3.numel() == cap0 + 1
    # growth leaves a margin so the next slightly larger take does not reallocate again
    ptr1 = sp.buffers[0].data_ptr()
    sp.take(1)
    sp.take(cap0 + 2)
    assert sp.buffers[0].data_ptr() == ptr1


def test_staging_reserve_sizes_once():
    ledger = DeviceLedger()
    sp = StagingPair(torch.device("cpu"), torch.float32, ledger)
    sp.reserve(1000)
    sp.reserve(10)  # a smaller reservation does not shrink it
    assert sp.reserved == 1000
    sp.take(10)
    sp.take(10)
    ptrs = [b.data_ptr() for b in sp.buffers]
    assert all(b.numel() >= 1000 for b in sp.buffers)
    peak = ledger.peak
    for numel in [50, 50, 400, 400, 999, 999, 1000, 1000, 7, 7]:
        _, view = sp.take(numel)
        assert view.numel() == numel
    assert [b.data_ptr() for b in sp.buffers] == ptrs  # no reallocation up to the reserved size
    assert ledger.peak == peak


def test_staging_registers_bytes_in_ledger():
    ledger = DeviceLedger()
    sp = StagingPair(torch.device("cpu"), torch.float16, ledger, name="stage")
    sp.take(100)
    assert set(ledger.held) == {"stage0"}
    assert ledger.held["stage0"] == sp.buffers[0].numel() * 2
    sp.take(40)
    assert set(ledger.held) == {"stage0", "stage1"}
    assert ledger.held["stage1"] == sp.buffers[1].numel() * 2
    total = sum(b.numel() * 2 for b in sp.buffers)
    assert ledger.current == total
    assert ledger.peak == total
    # growing buffer 0 replaces its entry rather than adding to it
    sp.take(1000)
    assert ledger.held["stage0"] == sp.buffers[0].numel() * 2
    assert ledger.current == sum(b.numel() * 2 for b in sp.buffers)
    assert ledger.peak == ledger.current


def test_staging_without_ledger_works():
    sp = StagingPair(torch.device("cpu"), torch.float32)
    idx, view = sp.take(5)
    view.copy_(torch.arange(5.0))
    assert idx == 0 and torch.equal(view, torch.arange(5.0))
