# SPDX-License-Identifier: Apache-2.0
"""The worker's view of the requests it logs: who the caller is, which sample, and
per-slot counters kept in numpy arrays so that a step's bookkeeping is vectorised."""

import re
from dataclasses import dataclass, replace
from itertools import repeat
from typing import Any

import numpy as np


@dataclass
class Request:
    """What the worker knows of one request; positions are absolute in the request."""

    req_id: str  # the id the caller gets back
    engine_req_id: str
    sample: int | None  # index among the n samples of a parallel-sampling request
    prompt_len: int
    prompt_tokens_cached: int  # positions computed before its first forward
    max_len: int = 1 << 62  # prompt + max_tokens: the engine keeps no token beyond
    stops: tuple[int, ...] = ()  # token ids that end it (EOS unless ignored, stop_token_ids)
    stop_from: int = 0  # the first position where a stop token counts (min_tokens)


def prompt_len_of(new_req) -> int:
    if new_req.prompt_token_ids is not None:
        return len(new_req.prompt_token_ids)
    return 0 if new_req.prompt_embeds is None else new_req.prompt_embeds.shape[0]


def request_from(new_req, max_model_len: int | None = None) -> Request | None:
    """None for requests no caller sent (vLLM's warm-up): only the front end sets
    external_req_id. With ``max_model_len`` (speculative decoding), also where the
    engine ends it: its length limit and stop tokens."""
    engine_id = new_req.req_id
    external = getattr(new_req, "external_req_id", None)
    if external is None:
        return None
    prompt_len = prompt_len_of(new_req)
    max_len, stops, stop_from = max_model_len or 1 << 62, (), 0
    params = new_req.sampling_params if max_model_len is not None else None
    if params is not None:
        if params.max_tokens is not None:
            max_len = min(max_len, prompt_len + params.max_tokens)
        stops = tuple({t for t in (params.eos_token_id, *(params.stop_token_ids or ())) if t is not None})
        stop_from = prompt_len + max(getattr(params, "min_tokens", 0) or 0, 1) - 1
    return Request(
        req_id=external,
        engine_req_id=engine_id,
        sample=sample_index(engine_id, external),
        prompt_len=prompt_len,
        prompt_tokens_cached=new_req.num_computed_tokens,
        max_len=max_len,
        stops=stops,
        stop_from=stop_from,
    )


_SUFFIX = re.compile(r"(-[0-9a-f]{8})?")


def sample_index(engine_id: str, external: str) -> int | None:
    """i for the i-th child of a parallel-sampling request, "<i>_<caller id>[-<8 hex>]";
    None for "<caller id>[-<8 hex>]". String operations, not a pattern per request."""
    index, _, rest = engine_id.partition("_")
    if index.isdigit() and rest.startswith(external) and _SUFFIX.fullmatch(rest[len(external):]):
        return int(index)
    return None


NO_TOKEN = -2  # pads Slots.stops; -1 marks the sampler's rejected tokens


class Slots:
    """The open requests, each in a slot: per-slot counters live in numpy arrays so
    that a step's bookkeeping is a few vector operations, not a loop over requests."""

    def __init__(self) -> None:
        self.of: dict[str, int] = {}  # engine request id -> slot
        self.requests: list[Request | None] = []
        self.next_pos = np.zeros(0, dtype=np.int64)  # every position below it is logged
        self.routed = np.zeros(0, dtype=np.int64)
        self.recomputed = np.zeros(0, dtype=np.int64)
        self.cached = np.zeros(0, dtype=np.int64)  # positions the prefix cache served
        self.blocks = np.zeros(0, dtype=np.int64)  # KV blocks the writer knows of
        self.accepted = np.zeros(0, dtype=np.int64)  # draft positions verification kept
        self.rejected = np.zeros(0, dtype=np.int64)  # draft positions it threw away
        self.scheduled_end = np.zeros(0, dtype=np.int64)  # end of its last span, drafts included
        self.ended = np.zeros(0, dtype=bool)  # its last position logged: later rows are not its
        self.max_len = np.zeros(0, dtype=np.int64)  # Request.max_len
        self.stop_from = np.zeros(0, dtype=np.int64)  # Request.stop_from
        self.stops = np.full((0, 1), NO_TOKEN, dtype=np.int64)  # [slots, most stops] Request.stops
        self.free: list[int] = []
        self.generation = 0  # changes whenever a request opens or closes
        self.batch = ([], -1, np.zeros(0, np.int64), True)  # of_batch's last answer

    def open(self, request: Request) -> int:
        if not self.free:
            n = len(self.requests)
            self.requests += [None] * max(n, 64)
            for name in ("next_pos", "routed", "recomputed", "cached", "blocks", "accepted", "rejected",
                         "scheduled_end", "ended", "max_len", "stop_from"):
                setattr(self, name, np.resize(getattr(self, name), len(self.requests)))
            self.free = list(range(len(self.requests) - 1, n - 1, -1))
        if len(self.stops) < len(self.requests) or len(request.stops) > self.stops.shape[1]:
            stops = np.full((len(self.requests), max(self.stops.shape[1], len(request.stops))), NO_TOKEN)
            stops[: len(self.stops), : self.stops.shape[1]] = self.stops
            self.stops = stops
        slot = self.free.pop()
        self.generation += 1
        self.of[request.engine_req_id] = slot
        self.requests[slot] = request
        self.next_pos[slot] = self.routed[slot] = self.recomputed[slot] = 0
        self.cached[slot] = self.blocks[slot] = self.accepted[slot] = self.rejected[slot] = 0
        self.scheduled_end[slot] = 0
        self.ended[slot] = False
        self.max_len[slot], self.stop_from[slot] = request.max_len, request.stop_from
        self.stops[slot] = NO_TOKEN
        self.stops[slot, : len(request.stops)] = request.stops
        return slot

    def of_batch(self, req_ids) -> tuple[np.ndarray, bool]:
        """[n] each batch row's slot, -1 for a request no caller sent, and whether all
        are a caller's. Most decode steps repeat the last batch while no request opened
        or closed: then the last answer (read-only) stands."""
        batch, generation, slots, all_mine = self.batch
        if generation == self.generation and batch == req_ids:
            return slots, all_mine
        slots = np.fromiter(map(self.of.get, req_ids, repeat(-1)), np.int64, len(req_ids))
        slots.flags.writeable = False
        all_mine = bool((slots >= 0).all())
        self.batch = (list(req_ids), self.generation, slots, all_mine)
        return slots, all_mine

    def close(self, engine_id: str) -> int | None:
        """The request's slot, now free; None for a request not open here."""
        slot = self.of.pop(engine_id, None)
        if slot is None:
            return None
        self.requests[slot] = None
        self.generation += 1
        self.free.append(slot)
        return slot


@dataclass
class PendingStep:
    """A speculative step from its forward until it is settled: the batch as the runner
    gave it (host copies), and its rows' region of the ring (None without logged layers)."""

    req_ids: list[str]  # engine request ids, in the batch's order
    first: np.ndarray  # [n] each request's first row
    ends: np.ndarray  # [n] one past its last row
    pos: np.ndarray  # [n] the runner's position of its first row (ahead under async scheduling)
    num_rows: int
    drafts: np.ndarray  # [n] draft rows ending each span
    region: tuple | None
    tokens: Any = None  # the sampler's tokens [n, 1 + drafts] (host), False: never sampled
    ready: Any = None  # a CUDA event: ``tokens`` landed on the host


@dataclass(frozen=True)
class HeldStep:
    """A speculative step's rows by request, in the batch's order, from end_forward
    until sampling says which drafts each request kept."""

    slots: np.ndarray  # [n] slot, -1 for a request no caller sent
    first: np.ndarray  # [n] its first row in the step
    ends: np.ndarray  # [n] one past its last row
    pos: np.ndarray  # [n] the position of its first row
    num_rows: int  # rows of the step (the device buffers' used part)
    input_ids: Any  # the step's token ids [>= num_rows], or None
    drafts: np.ndarray  # [n] draft rows ending each span
    accepted: np.ndarray | None = None  # [n] of them, kept
    rejected: np.ndarray | None = None  # [n] cut off

    def mine(self) -> "HeldStep":
        """Only the requests a caller sent."""
        keep = self.slots >= 0
        per_request = ("slots", "first", "ends", "pos", "drafts", "accepted", "rejected")
        return replace(self, **{name: getattr(self, name)[keep] for name in per_request
                                if getattr(self, name) is not None})

    def rows(self) -> tuple:
        """RouteLogger._log_rows's arguments."""
        return self.slots, self.first, self.ends, self.pos, self.num_rows, self.input_ids

    def verified(self, tokens: np.ndarray, slots: "Slots") -> "HeldStep":
        """The caller's requests, each cut to the rows it keeps: ``tokens`` [n, 1 +
        drafts] the sampler's, -1 after the first rejected draft."""
        cut = (self.ends - self.first) - self._kept(tokens, slots)
        rejected = np.minimum(cut, self.drafts)
        return replace(self, ends=self.ends - cut, accepted=self.drafts - rejected, rejected=rejected).mine()

    def _kept(self, tokens: np.ndarray, slots: "Slots") -> np.ndarray:
        """[n] rows each request keeps of its step's, as the scheduler cuts its tokens:
        up to the first rejected draft, its length limit, its first stop token; none
        once it has ended (async scheduling runs a step more before the scheduler
        learns that a step's drafts ended it). Sets ``slots.ended`` where it ends."""
        rows = self.ends - self.first
        kept = rows.copy()
        mine = self.slots >= 0
        at = np.where(mine, self.slots, 0)
        done = mine & slots.ended[at]
        i = np.flatnonzero(mine & ~done & (self.drafts > 0))
        if i.size:
            at_i, sampled = at[i], tokens[i]
            first = (self.pos + rows - self.drafts)[i]  # the first sampled token's position
            k = np.minimum((sampled >= 0).sum(axis=1), slots.max_len[at_i] - first)
            column = np.arange(sampled.shape[1])
            stop = ((sampled[:, :, None] == slots.stops[at_i][:, None, :]).any(axis=2)
                    & (column < k[:, None]) & (first[:, None] + column >= slots.stop_from[at_i][:, None]))
            stopped = stop.any(axis=1)
            k = np.where(stopped, stop.argmax(axis=1) + 1, k)
            kept[i] = k
            slots.ended[at_i[stopped | (first + k >= slots.max_len[at_i])]] = True
        kept[done] = 0
        return kept

    def without_drafts(self) -> "HeldStep":
        """Every draft cut off: for a step whose sampling never came."""
        return replace(self, ends=self.ends - self.drafts).mine()

