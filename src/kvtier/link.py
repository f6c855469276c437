"""Host <-> device copies, and the exact count of bytes moved each way.

On CUDA, host->device copies run on side streams and return an event; the compute stream waits on that
event only where it reads the data. Device->host writes run on their own stream, and every later
host->device copy is ordered after them (a page written back must land before it is read again).
Without CUDA the same calls copy synchronously and return None, so the logic and the counters are the same.
"""

from __future__ import annotations

import contextlib

import torch

from .sizes import grown


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Link:
    """The one owner of traffic between host memory and the device."""

    def __init__(self, device: torch.device | str, lanes: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self.h2d_copies = 0
        self.d2h_copies = 0
        if self.cuda:
            self.h2d_streams = [torch.cuda.Stream(self.device) for _ in range(lanes)]
            self.d2h_stream = torch.cuda.Stream(self.device)
            self._last_d2h = None

    def h2d(self, dst: torch.Tensor, src: torch.Tensor, lane: int = 0):
        """Copy host `src` into device `dst`. Returns an event to wait on before reading `dst` (None on CPU).

        The copy is queued after everything already queued on the compute stream, so a staging buffer can be
        refilled as soon as the attention that read it has been launched.
        """
        _check_pair(dst, src)
        self.h2d_bytes += nbytes(src)
        self.h2d_copies += 1
        if not self.cuda:
            dst.copy_(src)
            return None
        event = self.async_rows(lambda: dst.copy_(src, non_blocking=True), lane=lane)
        dst.record_stream(self.h2d_streams[lane % len(self.h2d_streams)])
        return event

    def async_rows(self, copy, *args, lane: int = 0):
        """Run `copy(*args)`, a device-side copy that reads host memory itself (a zero-copy kernel), on copy
        lane `lane`, ordered after the compute work queued so far and the last write-back. Returns the event to
        wait on before reading what it wrote (None on CPU, where it runs at once). Its bytes are counted by the
        caller, which alone knows on the device how many rows were real."""
        if not self.cuda:
            copy(*args)
            return None
        stream = self.h2d_streams[lane % len(self.h2d_streams)]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        if self._last_d2h is not None:
            stream.wait_event(self._last_d2h)
        with torch.cuda.stream(stream):
            copy(*args)
            event = torch.cuda.Event()
            event.record(stream)
        return event

    def d2h(self, dst: torch.Tensor, src: torch.Tensor):
        """Write device `src` into host `dst` (pinned for a truly asynchronous copy). Returns an event or None."""
        _check_pair(dst, src)
        self.d2h_bytes += nbytes(src)
        self.d2h_copies += 1
        if not self.cuda:
            dst.copy_(src)
            return None
        stream = self.d2h_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        src.record_stream(stream)  # the allocator must not hand src's memory out before the copy has read it
        self._last_d2h = event
        return event

    def on_lane(self, lane: int):
        """Context in which device work runs on copy lane `lane` (ordered after that lane's copies)."""
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.h2d_streams[lane % len(self.h2d_streams)])

    def record(self, lane: int):
        """An event marking everything queued so far on lane `lane` (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.h2d_streams[lane % len(self.h2d_streams)])
        return event

    def wait(self, event) -> None:
        """Make the compute stream wait for `event` (no-op on CPU or for None)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until every copy issued so far has finished (host reads of written-back pages)."""
        if self.cuda:
            for stream in self.h2d_streams:
                stream.synchronize()
            self.d2h_stream.synchronize()

    def counters(self) -> dict:
        return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes}


def _check_pair(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy between mismatched tensors: dst {tuple(dst.shape)} {dst.dtype}, "
                         f"src {tuple(src.shape)} {src.dtype}")


class StagingPair:
    """Two device buffers used in turn, so one can be filled while the other is read.

    `take()` hands out the buffer not handed out last time (or the one the caller is not reading), grown
    to at least `numel` elements; the caller records which data it put there. Growth reallocates (`sizes.grown`).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, ledger=None, name: str = "staging"):
        self.device, self.dtype = device, dtype
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.turn = 0
        self.ledger, self.name = ledger, name
        self.reserved = 0

    def reserve(self, numel: int) -> None:
        """Size both buffers for `numel` elements at their next growth (no later reallocation)."""
        self.reserved = max(self.reserved, numel)

    def take(self, numel: int, avoid: int | None = None) -> tuple[int, torch.Tensor]:
        """A buffer of `numel` elements: the one not handed out last time, or the one that is not `avoid`."""
        index = self.turn if avoid is None else 1 - avoid
        self.turn = 1 - index
        buf = self.buffers[index]
        if buf is None or buf.numel() < numel:
            buf = torch.empty(grown(numel, self.reserved), dtype=self.dtype, device=self.device)
            self.buffers[index] = buf
            if self.ledger is not None:
                self.ledger.hold(f"{self.name}{index}", buf)
        return index, buf[:numel]
