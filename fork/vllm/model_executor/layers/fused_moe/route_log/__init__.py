# SPDX-License-Identifier: Apache-2.0
"""The MoE route log (entry point: fused_moe/route_logger.py). Two processes per writing
worker, and the file names say which code runs where:

    format.py     the log's format, defined once (also analysis/route_format.py)
    config.py     the VLLM_LOG_MOE* settings, checked in the front end
    channel.py    engine -> writer: a shared-memory ring and a pipe of messages
    metrics.py    live expert load for /metrics
    engine/       the engine's process (torch): layers, header, requests, device copies,
                  speculative steps held until their sampling
    writer/       the writer's process (numpy, pyarrow, prometheus_client): JSONL
                  text, parquet parts, the prefix-cache replay store, the load counts, the
                  log's file
"""
