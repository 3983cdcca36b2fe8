# SPDX-License-Identifier: Apache-2.0
"""Speculative decoding in the engine's process: each step's rows go to the ring after
its forward, and the step waits, with every later begin_step, in an ordered queue until
its sampling says which drafts each request kept (route_logger.py says how; requests.py
holds the kept-row rule). Only the thread that runs the model calls it."""

from collections import deque
from dataclasses import replace
from itertools import repeat

import numpy as np
import torch

from vllm.model_executor.layers.fused_moe.route_log.channel import WriterGone
from vllm.model_executor.layers.fused_moe.route_log.engine.requests import HeldStep, PendingStep


class HeldSteps:
    def __init__(self, logger):
        self.logger = logger  # the RouteLogger: its requests, slots, copies and channel
        self.drafts: dict[str, list[int]] = {}  # engine request id -> this step's draft tokens
        # begin_step calls (the scheduler's lists) and PendingSteps, settled in this order.
        self.queue: deque = deque()

    def begin_step(self, scheduler_output, new_reqs, cached, finished) -> None:
        if self.queue and isinstance(self.queue[-1], PendingStep) and self.queue[-1].tokens is None:
            self.queue[-1].tokens = False  # no sampling came: its drafts' fate is unknown
        self.drafts = scheduler_output.scheduled_spec_decode_tokens
        # The scheduler's lists, as they are now: settled later.
        self.queue.append((list(new_reqs), list(cached.req_ids), list(cached.new_block_ids),
                           set(cached.resumed_req_ids), set(finished)))
        self.drain()

    def hold(self, req_ids, starts, num_computed_tokens, input_ids) -> None:
        """A speculative step: its rows go to the ring now, before the next forward
        overwrites the buffers; which of them count is settled after its sampling."""
        log = self.logger
        n = len(req_ids)
        drafts = np.zeros(n, np.int64)
        if self.drafts:
            drafts[:] = np.fromiter(map(len, map(self.drafts.get, req_ids, repeat(()))), np.int64, n)
        num_rows, region = int(starts[n]), None
        if log.layers:
            if not log.channel.has_room(log.copies.size(num_rows, n)):
                self.drain(wait=True)  # held regions pin the ring: settle them first
            try:
                region = log.copies.copy_rows(num_rows, n, input_ids)
            except WriterGone as e:
                log._writer_gone(e)
                return
        self.queue.append(PendingStep(list(req_ids), starts[:-1].copy(), starts[1:].copy(),
                                      np.array(num_computed_tokens[:n], dtype=np.int64), num_rows, drafts, region))

    def end_sample(self, sampled_token_ids, num_sampled=None) -> None:
        """After sampling a held step: the sampler's tokens [num_reqs, 1 + drafts]; the
        first ``num_sampled`` [num_reqs] of each row count (Model Runner V2), or those
        before the first -1 (V1). Copied to the host without waiting for the device."""
        if not self.queue or not isinstance(step := self.queue[-1], PendingStep) or step.tokens is not None:
            return
        n = len(step.req_ids)
        tokens = sampled_token_ids[:n]
        if num_sampled is not None:
            kept = torch.arange(tokens.shape[1], device=tokens.device) < num_sampled[:n, None]
            tokens = torch.where(kept, tokens, -1)
        if tokens.is_cuda:
            step.tokens = tokens.to("cpu", non_blocking=True)
            step.ready = torch.cuda.Event()
            step.ready.record()
        else:
            step.tokens = tokens.clone()
        self.drain()

    def drain(self, wait: bool = False) -> None:
        """Settles the queue, oldest first, while its head is ready (or waiting for it)."""
        log = self.logger
        while self.queue and not log.stopped:
            item = self.queue[0]
            if isinstance(item, PendingStep):
                if item.tokens is None:
                    if not wait:
                        return
                    item.tokens = False  # closing before its sampling
                if item.ready is not None:
                    if wait:
                        item.ready.synchronize()
                    elif not item.ready.query():
                        return
                self.queue.popleft()
                self._settle(item)
            else:
                self.queue.popleft()
                log._begin(*item)

    def _settle(self, item: PendingStep) -> None:
        log = self.logger
        slots, _ = log.slots.of_batch(item.req_ids)
        mine = slots >= 0
        step = HeldStep(slots, item.first, item.ends, item.pos, item.num_rows, None, item.drafts).mine()
        if len(step.slots):
            # A start past the last kept row, within the last scheduled span: the host's
            # positions assumed drafts that were rejected (async scheduling).
            kept_end = log.slots.next_pos[step.slots]
            ahead = (step.pos > kept_end) & (step.pos <= log.slots.scheduled_end[step.slots])
            log.slots.scheduled_end[step.slots] = step.pos + step.ends - step.first
            if ahead.any():
                step = replace(step, pos=np.where(ahead, kept_end, step.pos))
        if item.tokens is False:
            step = step.without_drafts()
        else:
            step = step.verified(item.tokens.numpy()[mine], log.slots)
            np.add.at(log.slots.accepted, step.slots, step.accepted)
            np.add.at(log.slots.rejected, step.slots, step.rejected)
        log._log_rows(*step.rows(), region=item.region)
