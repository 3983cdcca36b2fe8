# SPDX-License-Identifier: Apache-2.0
"""Where a worker's route log goes: its file, locked and headed. Called once, when the logger starts."""

import fcntl
import json
import os

from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe.route_log.config import ENV_PATH, RouteLogError
from vllm.model_executor.layers.fused_moe.route_log.format import PARQUET_ROUTES, records_path

logger = init_logger(__name__)


def locked_log(path: str, format: str, meta: dict):
    """The log's file (a parquet log's records.jsonl), locked, emptied, its meta line written."""
    if format == "parquet":
        os.makedirs(os.path.join(path, PARQUET_ROUTES), exist_ok=True)
    log = open(records_path(path, format), "ab")  # truncated only once the lock is held
    try:
        fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.close()
        raise RouteLogError(f"{ENV_PATH}={path!r} is being written by another engine") from None
    log.truncate(0)
    log.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
    log.flush()
    return log
