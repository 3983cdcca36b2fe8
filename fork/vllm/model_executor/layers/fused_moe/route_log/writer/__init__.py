# SPDX-License-Identifier: Apache-2.0
"""Runs in the writer process (channel.RouteLogChannel starts it): numpy and pyarrow
only, loaded as a package of its own, without vLLM's or torch's imports."""
