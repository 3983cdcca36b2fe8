# SPDX-License-Identifier: Apache-2.0
"""The channel from an engine's worker to its route-log writer process.

Step data travel through a ring of shared memory (a memfd, mapped by both processes;
on CUDA also registered as pinned memory, so the device copies into it
asynchronously); small messages travel through a pipe, in order. Only numpy and the
standard library are imported here: the writer process loads this file without vLLM.

Ring, in bytes: a 64-byte header of int64 counters, then ``capacity`` bytes of data.
Positions in the data are counted since the start (monotonic) and wrap modulo
``capacity``; a step's region never wraps (the rest of the ring is skipped).
  header[CONSUMED]      written by the writer: every position below it is free again
  header[ENGINE_WAITS]  written by the engine: times it waited for room (ring or pipe)
  header[WAIT_NS]       written by the engine: total time it waited
  header[NOT_LOGGED]    written by the engine: requests no caller sent (vLLM's warm-up)
A step's region: int64 spans [n, 5] (slot, first position, first row, end row, first
row to render: rows before it ran again after a preemption), then int32 ids and
float32 weights, each [rows, layers, top_k], int32 input token ids [rows] (when the
model runner passes them), then an int64 trailer that the device copies a 1 into after
the rows: the writer waits for it.
"""

import fcntl
import json
import mmap
import os
import select
import struct
import subprocess
import sys
import time

import numpy as np

HEADER = 64
CONSUMED, ENGINE_WAITS, WAIT_NS, NOT_LOGGED = range(4)
ALIGN = 64

# Messages: <type u32, payload bytes u32> + payload.
FRAME = struct.Struct("<II")
REQUEST, REQUEST_END, STEP, NOT_LOGGED_ID, CLOSE, BLOCKS, CACHED = range(1, 8)
# The writer renders the request records (writer/render.py) from these: slot, req_id
# length, engine id length, prompt tokens sent, sample (-1: none), prompt_len,
# prompt_tokens_cached; then req_id and the engine's id (TEXT), int32 prompt tokens.
REQUEST_HEAD = struct.Struct("<IIIIqqq")
TEXT = ("utf-8", "surrogatepass")  # any str the caller gave, and back
# slot, finished, routed, recomputed and cached positions, accepted and rejected draft
# positions (-1: not speculative decoding).
REQUEST_END_HEAD = struct.Struct("<IIqqqqq")
STEP_HEAD = struct.Struct("<QQQQQ")  # data offset, end position, rows, spans, has token ids
BLOCKS_HEAD = struct.Struct("<II")  # slot, first block index; then int32 block ids
# CACHED: int64 [n, 3] (slot, first position, end position) served from the prefix
# cache, resolved by the writer after the STEP that follows it.
SPAN = 5  # int64 columns of a step's spans

WRITER_MAIN = (  # the writer's modules as a package of their own, without vllm's __init__
    "import sys, types; sys.path[:] = [p for p in sys.path if p]; "
    "pkg = types.ModuleType('moe_route_log'); pkg.__path__ = [sys.argv[1]]; "
    "sys.modules['moe_route_log'] = pkg; "
    "from moe_route_log.writer.writer import main; main(sys.argv[2])"
)


def step_layout(rows: int, spans: int, num_layers: int, top_k: int) -> tuple[int, int, int, int, int]:
    """Offsets of the ids, the weights, the token ids and the trailer in a step's
    region, and its size."""
    ids_at = spans * SPAN * 8
    weights_at = ids_at + rows * num_layers * top_k * 4
    tokens_at = weights_at + rows * num_layers * top_k * 4
    trailer_at = tokens_at + rows * 4
    trailer_at += -trailer_at % 8
    size = trailer_at + 8
    return ids_at, weights_at, tokens_at, trailer_at, size + -size % ALIGN


class WriterGone(RuntimeError):
    """The writer process exited: nothing more can be logged."""


class RouteLogChannel:
    """Engine side: owns the ring and the pipe, and starts the writer process.
    Only the thread that runs the model calls it."""

    def __init__(self, capacity: int, file_fd: int | None, writer_args: dict):
        self.capacity = capacity
        self.ring_fd = os.memfd_create("moe-route-log", os.MFD_CLOEXEC)
        os.ftruncate(self.ring_fd, HEADER + capacity)
        self.ring = _map(self.ring_fd, HEADER + capacity)
        self.header = np.frombuffer(self.ring, dtype=np.int64, count=HEADER // 8)
        self.produced = 0  # position after the last reserved region
        self.wait_ns = 0
        self.outbox = bytearray()  # messages posted, not yet written to the pipe
        read_end, self._pipe = os.pipe()
        try:
            fcntl.fcntl(self._pipe, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        except OSError:
            pass  # the system's limit is lower: 64 kB still holds ~1,000
        args = {**writer_args, "pipe_fd": read_end, "file_fd": file_fd, "ring_fd": self.ring_fd,
                "capacity": capacity}
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER_MAIN, here, json.dumps(args)],
            pass_fds=tuple(fd for fd in (read_end, file_fd, self.ring_fd) if fd is not None),
            stdin=subprocess.DEVNULL,
        )
        os.close(read_end)
        os.set_blocking(self._pipe, False)

    def has_room(self, size: int) -> bool:
        """Whether ``reserve(size)`` would return at once."""
        return self._end_of(size) - self.header[CONSUMED] <= self.capacity

    def _end_of(self, size: int) -> int:
        start = self.produced
        if start % self.capacity + size > self.capacity:
            start += self.capacity - start % self.capacity
        return start + size

    def reserve(self, size: int) -> tuple[int, int]:
        """(data offset, end position) of ``size`` free bytes; waits while the writer
        holds the ring (back-pressure: counted, never dropped)."""
        end = self._end_of(size)
        start = end - size
        if end - self.header[CONSUMED] > self.capacity:
            self._wait(lambda: end - self.header[CONSUMED] <= self.capacity)
        self.produced = end
        return start % self.capacity, end

    def post(self, kind: int, payload: bytes = b"") -> None:
        self.outbox += FRAME.pack(kind, len(payload))
        self.outbox += payload

    def flush(self) -> None:
        """Writes the posted messages: one system call for a step's worth of them."""
        data, self.outbox = self.outbox, bytearray()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._pipe, view):]
            except BlockingIOError:
                self._wait(lambda: bool(select.select([], [self._pipe], [], 0.05)[1]))
            except BrokenPipeError:
                raise WriterGone(self._exit_text()) from None

    def count_not_logged(self, engine_req_id: str) -> None:
        self.header[NOT_LOGGED] += 1
        if self.header[NOT_LOGGED] <= 20:
            self.post(NOT_LOGGED_ID, engine_req_id.encode())

    def close(self, timeout: float) -> int | None:
        """Asks the writer to finish (render what it holds, write the final 'end') and
        waits for it; returns its exit status, None if it did not exit in time."""
        try:
            self.post(CLOSE)
            self.flush()
        except WriterGone:
            pass
        os.close(self._pipe)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _wait(self, ready) -> None:
        t0 = time.perf_counter_ns()
        self.header[ENGINE_WAITS] += 1
        pause = 20e-6
        while not ready():
            if self.proc.poll() is not None:
                raise WriterGone(self._exit_text())
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        self.wait_ns += time.perf_counter_ns() - t0
        self.header[WAIT_NS] = self.wait_ns

    def _exit_text(self) -> str:
        return f"the route-log writer process exited with status {self.proc.poll()}"


class RingReader:
    """Writer side: the same ring, mapped from the inherited memfd."""

    def __init__(self, ring_fd: int, capacity: int):
        self.capacity = capacity
        self.ring = _map(ring_fd, HEADER + capacity)
        self.header = np.frombuffer(self.ring, dtype=np.int64, count=HEADER // 8)

    def array(self, offset: int, dtype, count: int) -> np.ndarray:
        return np.frombuffer(self.ring, dtype=dtype, count=count, offset=HEADER + offset)

    def release(self, end: int) -> None:
        self.header[CONSUMED] = end


def _map(fd: int, size: int) -> mmap.mmap:
    # Pages are faulted in now, at start-up, not by the first copy into each.
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
