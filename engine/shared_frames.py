"""Media frames from the API process to the engine-core process through a shared-memory ring
instead of the pipe.

Caller: engine.core_host (ProcessCore's sender thread writes, the core's CoreEndpoint reads).

Why: a request's frames (one 448x448 image: 602,112 uint8 bytes) through a 64 KiB pipe cost the
core's busy step thread about ten reads, four copies and waits on the writer (~440 us of CPU and
~1 ms of wall per request, bench/transport_cost.py). Through the ring the pipe carries ~1 KB
(`SharedFramesRequest`: the request with empty `frames`, where they start, their sizes), and the
core's items get read-only uint8 arrays over the ring's memory: no copy at all on its side.

The ring: one anonymous shared file (memfd: it has no name, so nothing can be left in /dev/shm),
HEADER_BYTES + RING_BYTES long, mapped (and populated) once by both processes at start-up.
Positions are monotonic byte counts; position p lives at HEADER_BYTES + p % size. A request's
frames are contiguous, back to back; one that would cross the end starts at the next lap instead:

      0                                                       size
      |..free..|== req k ==|== req k+1 ==|== req k+2 ==|..free..|
               ^ tail (released up to here)            ^ head (the sender wrote up to here)

- Only the sender thread writes, at head, and only while head + n - tail <= size; otherwise (the
  core holds too much, or one request's frames exceed the ring) the request goes inline, as before.
- The core receives in pipe order, which is ring order. A request's region is released when nothing
  in the core can read it any more: the item arrays are numpy views of one region array, every
  view keeps its base alive, and a weakref on that base flags the region when it dies (the request
  finished, was aborted, refused or failed, and every step that used it is gone; an array pickled to
  a TP worker is a copy). `consumed` advances over the released regions at the front; each outputs
  message carries it, and it becomes the writer's tail. A long-lived request holds the tail back:
  then the ring fills and new requests go inline until it is released.
- Lifetime of the memory: ProcessCore creates the file; the spawned core inherits it as a
  descriptor (multiprocessing's DupFd, as for the pipes) and maps it; each side closes its
  descriptor after mapping. It goes when both mappings are gone: ProcessCore.close() and the core's
  exit or death. Where memfd is unavailable (not Linux) every request goes inline.
"""

from __future__ import annotations

import collections
import logging
import mmap
import os
import struct
import weakref
from multiprocessing.reduction import DupFd

import msgspec
import numpy as np

from engine.protocol import EngineRequest

logger = logging.getLogger(__name__)

RING_BYTES = 64 * 1024 * 1024   # ~100 images of 448x448 held; resident (shared) from start-up
# Smaller frames go inline: the pipe moves them in one write, not worth a ring region.
MIN_SHARED_BYTES = 64 * 1024
MEMFD_NAME = "vlserve-frames"   # shown as /memfd:vlserve-frames in /proc/<pid>/maps
# The mapping starts with a header: [0:8) how many messages the sender has written to the request
# pipe (u64, stored after each write). The core compares it with what it has read and skips the
# pipe's poll() syscall on the steps when nothing new was sent. Frames start at HEADER_BYTES.
HEADER_BYTES = 64
_SENT_COUNT = struct.Struct("<Q")


class SharedFramesRequest(msgspec.Struct, array_like=True, gc=False):
    """An EngineRequest whose items' frames (empty here) wait in the ring."""

    request: EngineRequest
    start: int          # ring position of the first item's frames (monotonic)
    sizes: list[int]    # [num_items] bytes of each item's frames, back to back from start


class FrameRingWriter:
    """The API-process side. share() runs on the sender thread, acknowledge() on the reader."""

    def __init__(self, size: int = RING_BYTES) -> None:
        self.size = size
        self._fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        os.ftruncate(self._fd, HEADER_BYTES + size)
        # Populated: the ring's pages are allocated and mapped once, here, not faulted in per request.
        self._map = mmap.mmap(self._fd, HEADER_BYTES + size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        self._head = 0   # written up to (sender thread)
        self._tail = 0   # consumed up to, as the core last said (reader thread)
        self._num_sent = 0   # messages written to the request pipe (sender thread)
        self.num_shared = 0            # requests whose frames went through the ring
        self.num_inline_ring_full = 0  # requests with frames worth sharing that went inline: no room

    @classmethod
    def create(cls, size: int | None = None) -> "FrameRingWriter | None":
        """A ring of `size` bytes (RING_BYTES by default), or None where shared memory cannot be
        had: requests then go inline."""
        try:
            return cls(RING_BYTES if size is None else size)
        except (AttributeError, OSError) as exc:  # AttributeError: no memfd_create / MAP_POPULATE here
            logger.warning("media frames go through the pipe: no shared-memory ring (%s)", exc)
            return None

    def for_child(self) -> "FrameRingHandle":
        """What to pass to the spawned core (before start); it unpickles as a FrameRingReader."""
        return FrameRingHandle(self._fd, self.size)

    def close_descriptor(self) -> None:
        """After the core was spawned: the mapping stays, the descriptor is no longer needed."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def share(self, request: EngineRequest) -> SharedFramesRequest | None:
        """Copies the request's frames into the ring; None to send it inline instead."""
        frames = [item.frames for item in request.mm_items]
        total = sum(len(chunk) for chunk in frames)
        if total < MIN_SHARED_BYTES:   # (also every request of a text-only model: a ring of size 0)
            return None
        if total > self.size:
            self.num_inline_ring_full += 1
            return None
        start = self._head
        if start % self.size + total > self.size:
            start += self.size - start % self.size   # never wrap inside a request: next lap
        if start + total - self._tail > self.size:
            self.num_inline_ring_full += 1   # the core still holds too much
            return None
        offset = HEADER_BYTES + start % self.size
        for chunk in frames:
            self._map[offset:offset + len(chunk)] = chunk
            offset += len(chunk)
        self._head = start + total
        self.num_shared += 1
        items = [msgspec.structs.replace(item, frames=b"") for item in request.mm_items]
        return SharedFramesRequest(msgspec.structs.replace(request, mm_items=items), start,
                                   [len(chunk) for chunk in frames])

    def note_message_sent(self) -> None:
        """After each message written to the request pipe (sender thread), in order."""
        self._num_sent += 1
        _SENT_COUNT.pack_into(self._map, 0, self._num_sent)

    def acknowledge(self, consumed: int) -> None:
        """The core has released every region before ring position `consumed` (reader thread)."""
        self._tail = max(self._tail, consumed)

    @property
    def num_bytes_held(self) -> int:
        """Ring bytes written and not yet released by the core (as last acknowledged)."""
        return self._head - self._tail

    def close(self) -> None:
        """Only once nothing writes any more (the sender thread has ended)."""
        self.close_descriptor()
        self._map.close()


class FrameRingHandle:
    """The ring's descriptor on its way to the spawned core process (pickled at spawn)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size

    def __reduce__(self):
        # DupFd while spawning registers the descriptor to be passed to the child (as for the pipes).
        return _open_reader, (DupFd(self.fd), self.size)


def _open_reader(inherited, size: int) -> "FrameRingReader":
    return FrameRingReader(inherited.detach(), size)


class FrameRingReader:
    """The core-process side: a request's frames become read-only uint8 arrays over the ring (no
    copy). Its ring region is released when nothing can read it any more: every view of the item
    arrays has the region's array as its base (numpy collapses view chains down to the first array
    whose base is not an ndarray: here the region, whose base is the mapping's memoryview;
    test_shared_frames checks it), so a weakref on the region fires only after the last view died.
    Regions are released in any order; `consumed` advances over the released ones at the front."""

    def __init__(self, fd: int, size: int) -> None:
        try:
            self._map = mmap.mmap(fd, HEADER_BYTES + size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                  prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.size = size
        self._received = 0   # ring position after the last request received
        self._consumed = 0   # ring position before which every region is released
        # In ring order: (end position, [is_released], weakref to the region's array).
        self._regions: collections.deque[tuple[int, list[bool], weakref.ref]] = collections.deque()

    def receive(self, shared: SharedFramesRequest) -> EngineRequest:
        total = sum(shared.sizes)
        offset = shared.start % self.size
        if shared.start < self._received or offset + total > self.size:
            raise RuntimeError(f"frames at ring position {shared.start} (+{total}) but {self._received} "
                               f"was received already: the ring is out of step with the pipe")
        region = np.frombuffer(self._map, dtype=np.uint8, count=total, offset=HEADER_BYTES + offset)  # [total]
        is_released = [False]   # set by the weakref's callback (any thread: a flag only, no cycle)
        self._regions.append((shared.start + total, is_released,
                              weakref.ref(region, lambda _: is_released.__setitem__(0, True))))
        self._received = shared.start + total
        items, begin = [], 0
        for item, num_bytes in zip(shared.request.mm_items, shared.sizes, strict=True):
            items.append(msgspec.structs.replace(item, frames=region[begin:begin + num_bytes]))
            begin += num_bytes
        request = shared.request
        request.mm_items = items
        return request

    def num_messages_sent(self) -> int:
        """The sender's count of messages written to the pipe. Read without a lock: a stale or
        torn value only makes the caller poll the pipe one step later, or poll it for nothing."""
        return _SENT_COUNT.unpack_from(self._map, 0)[0]

    @property
    def consumed(self) -> int:
        """Ring position before which every region is released (the writer may reuse it).
        Called on the core's step thread only (the weakref callbacks only set flags)."""
        while self._regions and self._regions[0][1][0]:
            self._consumed = self._regions.popleft()[0]
        return self._consumed
