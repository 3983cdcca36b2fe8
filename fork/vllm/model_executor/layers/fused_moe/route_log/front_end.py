# SPDX-License-Identifier: Apache-2.0
"""What only the front end knows: how many generated tokens a caller got back.

The front end (the API server, or the process that made the ``LLM``) matches stop
strings in text the engine already computed, cuts the response there and aborts the
request; the engine may have computed positions past the cut by then. Before it sends
the abort, its OutputProcessor appends ``[engine request id, tokens returned]`` to a
file of its own (``ReturnedTokens``); the writer reads it when the worker reports the
request's end (``ReturnedReader``), which can only happen after the abort, so the line
is always there by then. ``request_end`` then says ``returned_tokens``.

No vLLM import: the writer process loads this file as well. The file lives in the
temporary directory of the host, so a writer on another host (multi-node data
parallelism) finds none and says so in its 'end' record.
"""

import atexit
import glob
import json
import os
import shutil
import sys
import tempfile

RETURNED_PREFIX = "vllm-moe-returned-"  # then the front end's pid


def returned_file() -> str:
    """Front end, as the engine's config is made: a new, empty file, removed at exit;
    if this process dies without its exit handlers, by the writers as they end, or at
    a later start-up."""
    remove_orphans(RETURNED_PREFIX)
    fd, path = tempfile.mkstemp(prefix=f"{RETURNED_PREFIX}{os.getpid()}-", suffix=".jsonl")
    os.close(fd)
    atexit.register(_remove, path)
    return path


def remove_orphans(prefix: str) -> None:
    """Files and directories of front ends that died without their exit handlers (SIGKILL)."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}*")):
        pid = os.path.basename(path)[len(prefix):].split("-")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove(path)
        except (ValueError, PermissionError):
            pass  # not ours by name, or another user's live process


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class ReturnedTokens:
    """Front end: OutputProcessor.route_log, called where it aborts a request that it
    ended itself (a stop string), before the abort is sent. Each call is one append of
    one line: several API servers share the file."""

    def __init__(self, path: str):
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    @classmethod
    def of(cls, vllm_config) -> "ReturnedTokens | None":
        settings = vllm_config.observability_config.moe_route_log
        path = settings and settings.get("returned_path")
        return cls(path) if path else None

    def returned(self, engine_req_id: str, detokenizer) -> None:
        if detokenizer is None or self.fd is None:  # pooling requests end in the engine
            return
        line = json.dumps([engine_req_id, detokenizer.num_output_tokens()]) + "\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as e:  # serving goes on; the log's counts stop here, and this says so
            self.fd = None
            print(f"ERROR [route_log front end] VLLM_LOG_MOE: cannot note the tokens returned to "
                  f"callers ({e.strerror}); from now on no request_end has returned_tokens",
                  file=sys.stderr, flush=True)


class ReturnedReader:
    """Writer: the lines appended so far, by engine request id. Called for each request
    that ends; lines of requests another writer logs (data parallelism) are dropped by
    ``keep_only``."""

    def __init__(self, path: str | None):
        self.file = None
        self.error = None  # why no counts can be read
        self.tail = b""  # a line still being appended
        self.counts: dict[str, int] = {}
        if path is not None:
            try:
                self.file = open(path, "rb", buffering=0)
            except OSError as e:
                self.error = f"the front end's file of returned tokens: {e.strerror} ({path})"

    def pop(self, engine_req_id: str) -> int | None:
        """Tokens returned to the caller of a request the front end ended; None for
        one the engine ended."""
        if self.file is not None and engine_req_id not in self.counts:
            *lines, self.tail = (self.tail + self.file.read()).split(b"\n")
            for line in lines:
                req_id, count = json.loads(line)
                self.counts[req_id] = count
        return self.counts.pop(engine_req_id, None)

    def keep_only(self, open_requests: dict) -> None:
        """Drops the lines of requests not open here (values: engine ids). Called with
        the pipe drained: a request is opened in the pipe before its first step, so
        before the front end can write its line; a line of none of ours is another
        writer's."""
        if self.counts:
            open_ids = set(open_requests.values())
            self.counts = {k: v for k, v in self.counts.items() if k in open_ids}
