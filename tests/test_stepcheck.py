"""StepCounter and no_host_sync: every kind of host read is seen once, plain ops are not reads, modes unwind."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from kvtier.stepcheck import HostSyncError, StepCounter, no_host_sync

X = torch.arange(6.0)
MASK = X > 2

SYNCS = {  # call -> the one name it is counted under
    "item": (lambda: X[1].item(), "item"),
    "bool": (lambda: bool(X[1]), "bool"),
    "if any": (lambda: 1 if MASK.any() else 0, "bool"),
    "int": (lambda: int(X[1]), "int"),
    "float": (lambda: float(X[1]), "float"),
    "index": (lambda: [0, 1, 2][X[1].long()], "index"),
    "tolist": (lambda: X.tolist(), "tolist"),
    "cpu of a cpu tensor": (lambda: X.cpu(), "cpu"),
    "to cpu": (lambda: X.to("cpu"), "to(cpu)"),
    "to device=cpu": (lambda: X.to(device="cpu", dtype=torch.float16), "to(cpu)"),
    "numpy": (lambda: X.numpy(), "numpy"),
    "np.asarray": (lambda: np.asarray(X), "numpy"),
    "nonzero": (lambda: MASK.nonzero(), "nonzero"),
    "one-argument where": (lambda: torch.where(MASK), "nonzero"),
    "masked_select": (lambda: torch.masked_select(X, MASK), "masked_select"),
    "unique": (lambda: torch.unique(X), "_unique2"),
    "unique dim": (lambda: torch.unique(X.view(2, 3), dim=0), "unique_dim"),
    "unique_consecutive": (lambda: torch.unique_consecutive(X), "unique_consecutive"),
    "equal": (lambda: torch.equal(X, X), "equal"),
    "boolean mask index": (lambda: X[MASK], "boolean mask index"),
    "boolean mask assign of a tensor": (lambda: X.clone().__setitem__(MASK, torch.zeros(3)), "boolean mask index"),
    "repeat_interleave by a tensor": (lambda: X[:2].repeat_interleave(torch.tensor([1, 2])), "repeat_interleave"),
    "format": (lambda: f"{X[0]:.2f}", "repr"),
}

PLAIN = {
    "arithmetic": lambda: (X * 2 + 1).softmax(0).cumsum(0),
    "tensor from Python numbers": lambda: torch.tensor([1, 2, 3]),
    "arange": lambda: torch.arange(5),
    "full": lambda: torch.full((2, 2), 3.0),
    "to a dtype": lambda: X.to(torch.float16),
    "non-blocking to cpu": lambda: X.to("cpu", non_blocking=True),
    "to another tensor's device": lambda: X.to(device=MASK.device, dtype=torch.float64),
    "masked_fill": lambda: X.masked_fill(MASK, 0.0),
    "boolean mask assign of a number": lambda: X.clone().__setitem__(MASK, 0.0),
    "where with three arguments": lambda: torch.where(MASK, X, -X),
    "topk and gather": lambda: X.gather(0, X.topk(2).indices),
    "integer index": lambda: X[torch.tensor([0, 2])],
    "repeat_interleave by an int": lambda: X.repeat_interleave(2),
    "repeat_interleave with output_size": lambda: X[:2].repeat_interleave(torch.tensor([1, 2]), output_size=3),
    "module.cpu()": lambda: torch.nn.Linear(2, 2).cpu(),
    "module.to('cpu')": lambda: torch.nn.Linear(2, 2).to("cpu"),
    "shape arithmetic": lambda: X.shape[0] * X.size(-1) + X.numel(),
}


def _no_modes():
    return not _get_current_function_mode_stack() and not _get_current_dispatch_mode_stack()


@pytest.mark.parametrize("kind", SYNCS)
def test_each_host_read_is_counted_once_and_raises(kind):
    call, name = SYNCS[kind]
    with StepCounter() as counter:
        call()
    assert counter.syncs == {name: 1} and counter.total_syncs == 1
    with pytest.raises(HostSyncError, match=rf"^{re.escape(name)}: .*must not read device values on the host"):
        with no_host_sync():
            call()
    assert _no_modes()


@pytest.mark.parametrize("kind", PLAIN)
def test_plain_ops_are_not_host_reads(kind):
    with StepCounter() as counter:
        PLAIN[kind]()
    assert counter.total_syncs == 0, counter.syncs
    with no_host_sync():
        PLAIN[kind]()


def test_ops_are_counted_and_add_up_over_blocks():
    counter = StepCounter()
    with counter:
        y = X * 2
    assert counter.ops == 1
    with counter:
        (y + 1).sum()
        X[1].item()
    assert counter.ops == 5 and counter.syncs == {"item": 1}  # mul, add, sum, select, the item's read


def test_nesting():
    with StepCounter() as outer:
        X.sum()
        with StepCounter() as inner:
            X[1].item()
            torch.nn.Linear(2, 2).cpu()
            X.tolist()
        with pytest.raises(HostSyncError, match="^nonzero"):
            with no_host_sync():  # raises before the call runs: the outer counter never sees it
                MASK.nonzero()
        assert len(_get_current_dispatch_mode_stack()) == 1
    assert inner.syncs == {"item": 1, "tolist": 1}
    assert outer.syncs == {"item": 1, "tolist": 1}
    assert outer.ops > inner.ops > 0
    with pytest.raises(HostSyncError, match="^equal"):
        with no_host_sync():
            with StepCounter() as innermost:  # counts first, then the outer guard raises
                torch.equal(X, X)
    assert innermost.syncs == {"equal": 1}
    assert _no_modes()


def test_an_active_counter_cannot_be_entered_again():
    counter = StepCounter()
    with counter:
        with pytest.raises(RuntimeError, match="already active"):
            counter.__enter__()
    assert _no_modes()


def test_modes_are_restored_on_exception():
    with pytest.raises(ZeroDivisionError):
        with StepCounter():
            X.sum()
            1 / 0
    assert _no_modes()
    with pytest.raises(HostSyncError):
        with no_host_sync():
            bool(X.any())
    assert _no_modes()
    with StepCounter() as counter:  # a fresh one works as before
        X[0].item()
    assert counter.syncs == {"item": 1}


def test_host_sync_error_is_a_runtime_error():
    assert issubclass(HostSyncError, RuntimeError)
