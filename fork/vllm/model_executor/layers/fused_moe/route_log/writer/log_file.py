# SPDX-License-Identifier: Apache-2.0
"""The log's file, as the writer process appends to it: whole records, a provisional
'end' that the next write cuts off again, and the first write error, after which
nothing more is written (the log stops, generation goes on)."""

import os
import sys
import time


class LogFile:
    def __init__(self, fd: int | None, path: str):
        # None: no log, only the load for /metrics (VLLM_LOG_MOE_METRICS alone)
        self.file = os.fdopen(fd, "ab", buffering=1 << 20) if fd is not None else None
        self.path = path
        self.error: str | None = None  # the first write error
        self.provisional_at: int | None = None  # offset of a provisional 'end'

    @property
    def writable(self) -> bool:
        return self.file is not None and self.error is None

    def write(self, data: bytes) -> None:
        if self.writable:
            try:
                self._cut_provisional()
                self.file.write(data)
            except OSError as e:
                self.fail(e)

    def write_provisional(self, line: bytes) -> None:
        """``line``, to be cut off before the next write."""
        if self.writable:
            try:
                self._cut_provisional()
                offset = self.file.tell()
                self.file.write(line)
                self.provisional_at = offset
            except OSError as e:
                self.fail(e)

    def flush(self) -> None:
        if self.writable:
            try:
                self.file.flush()
            except OSError as e:
                self.fail(e)

    def fail(self, e: Exception) -> None:
        if self.error is None:
            self.error = f"{type(e).__name__}: {e}"
            stamp = time.strftime("%m-%d %H:%M:%S")
            print(f"ERROR {stamp} [route_log writer] VLLM_LOG_MOE: writing {self.path} failed "
                  f"({self.error}); the route log stops here and generation goes on",
                  file=sys.stderr, flush=True)

    def _cut_provisional(self) -> None:
        if self.provisional_at is not None:
            self.file.flush()
            self.file.truncate(self.provisional_at)
            self.file.seek(self.provisional_at)  # truncate leaves the position where it was
            self.provisional_at = None
