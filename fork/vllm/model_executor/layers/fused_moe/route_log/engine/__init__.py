# SPDX-License-Identifier: Apache-2.0
"""Runs in the engine's worker process, on the model's thread (route_logger.py calls it)."""
