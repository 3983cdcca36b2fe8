# SPDX-License-Identifier: Apache-2.0
"""A step's rows, from the device buffers the forward captured into, to the writer:
asynchronous copies into the shared ring, then a message. Engine side, on the model's
thread, after the forward (the writer process never imports this: it needs torch).

Region layout: channel.step_layout. The copies are queued on the forward's
stream, after this forward and before the next one overwrites the buffers; the trailer
lands after the rows and tells the writer they are there. With speculative decoding
the spans follow later (``post``), once sampling has said which draft rows count.
"""

import numpy as np
import torch

from vllm.model_executor.layers.fused_moe.route_log.channel import (
    HEADER,
    SPAN,
    STEP,
    STEP_HEAD,
    RouteLogChannel,
    step_layout,
)


class StepCopies:
    """Owns the ring's torch views, made once: a step slices and copies (four copies,
    no views), since every torch call on the model's thread may hand the GIL to another
    thread. ``ids``, ``weights``: the forward's buffers [max_rows, layers, top_k]."""

    def __init__(self, channel: RouteLogChannel, ids: torch.Tensor, weights: torch.Tensor, pin: bool):
        self.channel = channel
        ring = torch.frombuffer(channel.ring, dtype=torch.uint8)
        if pin:  # pinned, so that device copies into it are asynchronous
            error = torch.cuda.cudart().cudaHostRegister(ring.data_ptr(), ring.numel(), 0)
            if int(error) != 0:
                raise RuntimeError(f"pinning the {channel.capacity >> 20} MiB buffer failed ({error})")
        # step_layout puts int32/float32 arrays at multiples of 4 bytes, the trailer of 8.
        self.ring_i32, self.ring_f32, self.ring_i64 = (
            ring.view(dtype) for dtype in (torch.int32, torch.float32, torch.int64))
        self.ids, self.weights = ids.view(-1), weights.view(-1)  # row-major: a step's rows lead
        self.shape = ids.shape[1:]  # [layers, top_k]
        self.one = torch.ones(1, dtype=torch.int64, device=ids.device)  # the trailer's word

    def send(self, spans: tuple[np.ndarray, ...], num_rows: int, input_ids) -> None:
        """``spans``: the step's SPAN columns, [n] each; the first ``num_rows`` rows of
        the buffers (and of ``input_ids``, the step's token ids, when given)."""
        self.post(self.copy_rows(num_rows, len(spans[0]), input_ids), spans)

    def size(self, num_rows: int, num_spans: int) -> int:
        return step_layout(num_rows, num_spans, *self.shape)[-1]

    def copy_rows(self, num_rows: int, num_spans: int, input_ids) -> tuple[int, int, int, int, bool]:
        """Reserves a step's region for up to ``num_spans`` spans and queues the device
        copies of its rows and trailer; the region, for ``post``. Call before the next
        forward overwrites the buffers."""
        ids_at, weights_at, tokens_at, trailer_at, size = step_layout(num_rows, num_spans, *self.shape)
        offset, end = self.channel.reserve(size)
        at = HEADER + offset
        np.frombuffer(self.channel.ring, np.int64, 1, at + trailer_at)[0] = 0
        cells = num_rows * self.shape.numel()
        first = (at + ids_at) // 4
        self.ring_i32[first : first + cells].copy_(self.ids[:cells], non_blocking=True)
        first = (at + weights_at) // 4
        self.ring_f32[first : first + cells].copy_(self.weights[:cells], non_blocking=True)
        if input_ids is not None:
            first = (at + tokens_at) // 4
            self.ring_i32[first : first + num_rows].copy_(input_ids[:num_rows], non_blocking=True)
        first = (at + trailer_at) // 8
        self.ring_i64[first : first + 1].copy_(self.one, non_blocking=True)
        return offset, end, num_rows, num_spans, input_ids is not None

    def post(self, region: tuple[int, int, int, int, bool], spans: tuple[np.ndarray, ...]) -> None:
        """Tells the writer of a region ``copy_rows`` filled: its spans, at most the
        region's; the rest are left empty (no rows)."""
        offset, end, num_rows, num_spans, has_tokens = region
        table = np.frombuffer(self.channel.ring, np.int64, num_spans * SPAN, HEADER + offset).reshape(num_spans, SPAN)
        n = len(spans[0])
        for column, values in enumerate(spans):
            table[:n, column] = values
        table[n:] = 0
        self.channel.post(STEP, STEP_HEAD.pack(offset, end, num_rows, num_spans, has_tokens))
        self.channel.flush()
