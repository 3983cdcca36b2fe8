# SPDX-License-Identifier: Apache-2.0
"""JSONL rendering of route records, whole columns at a time, and of request records
from the fields the engine sends (numpy only: the writer process imports this without
vLLM or torch)."""

import json

import numpy as np

from ..format import WEIGHT_DECIMALS

WEIGHT_SCALE = 10**WEIGHT_DECIMALS


def fields_text(fields: dict) -> bytes:
    """',"name":value' for each of a logger's extra request fields (dp_rank)."""
    return b"".join(b',"%s":%s' % (name.encode(), json.dumps(value).encode()) for name, value in fields.items())


def request_prefix(req_id: str, sample: int | None) -> bytes:
    """'"req_id":...,["sample":n,]': what route and request records of a request start with."""
    return b'"req_id":%s,%s' % (json.dumps(req_id).encode(), b"" if sample is None else b'"sample":%d,' % sample)


def request_line(prefix: bytes, engine_req_id: str, prompt_len: int, cached: int, extra: bytes) -> bytes:
    """A 'request' record; ``prefix`` '"req_id":...,' as in route records."""
    return (b'{"type":"request",%s"engine_req_id":%s,"prompt_len":%d,"prompt_tokens_cached":%d%s}\n'
            % (prefix, json.dumps(engine_req_id).encode(), prompt_len, cached, extra))


def request_end_line(prefix: bytes, finished: bool, routed: int, recomputed: int, cached: int,
                     accepted: int, rejected: int, extra: bytes) -> bytes:
    """A 'request_end' record; ``accepted`` < 0: no draft counts (no speculative decoding)."""
    drafts = (b',"accepted_draft_positions":%d,"rejected_draft_positions":%d' % (accepted, rejected)
              if accepted >= 0 else b"")
    return (b'{"type":"request_end",%s"finished":%s,"routed_positions":%d,"recomputed_positions":%d,'
            b'"cached_positions":%d%s%s}\n'
            % (prefix, b"true" if finished else b"false", routed, recomputed, cached, drafts, extra))


def render_rows(ids: np.ndarray, weights: np.ndarray, prefixes: np.ndarray,
                positions: np.ndarray, layers: list[int]) -> bytes | memoryview:
    """Route records of ``n`` rows, one line per (row, layer), row-major.

    ids int32 / weights float32 [n, num_layers, top_k]; prefixes uint8 [n, width]: each
    row's '"req_id":...,' bytes padded with spaces; positions int64 [n]: token_idx.
    Numbers are right-aligned in fixed-width fields padded with spaces (valid JSON
    whitespace), so every line of one call has the same length.
    """
    n, num_layers, top_k = ids.shape
    if n == 0:
        return b""
    flat_ids = ids.reshape(-1, top_k).astype(np.int64)
    scaled = np.rint(weights.reshape(-1, top_k).astype(np.float64) * WEIGHT_SCALE)
    if flat_ids.min() < 0 or not np.isfinite(scaled).all() or scaled.min() < 0:
        return render_rows_plain(ids, weights, prefixes, positions, layers)
    scaled = scaled.astype(np.int64)
    pieces: list = [b'{"type":"route",', np.repeat(prefixes, num_layers, axis=0), b'"token_idx":']
    pieces += [_digits(np.repeat(positions.astype(np.int64), num_layers)), b',"layer":']
    pieces += [_digits(np.tile(np.asarray(layers, dtype=np.int64), n)), b',"topk_ids":[']
    id_width = _width(flat_ids)
    for k in range(top_k):
        pieces += [b"," if k else b"", _digits(flat_ids[:, k], id_width)]
    pieces.append(b'],"topk_weights":[')
    int_width = _width(scaled // WEIGHT_SCALE)
    for k in range(top_k):
        pieces += [b"," if k else b"", _digits(scaled[:, k] // WEIGHT_SCALE, int_width), b"."]
        pieces.append(_digits(scaled[:, k] % WEIGHT_SCALE, 9, pad=ord("0")))
    pieces.append(b"]}\n")
    return _assemble(pieces, n * num_layers)


def render_rows_plain(ids, weights, prefixes, positions, layers) -> bytes:
    """Record by record, with json, from render_rows' own arguments: the fallback for
    values the fast path cannot write (negative ids, non-finite weights) and the
    reference the tests hold it to."""
    lines = []
    for row in range(ids.shape[0]):
        prefix = bytes(prefixes[row]).decode().rstrip(" ")
        for slot, layer in enumerate(layers):
            weights_out = [round(float(w), 9) if np.isfinite(w) else None for w in weights[row, slot]]
            lines.append(
                f'{{"type":"route",{prefix}"token_idx":{int(positions[row])},"layer":{layer},'
                f'"topk_ids":{json.dumps(ids[row, slot].tolist())},'
                f'"topk_weights":{json.dumps(weights_out)}}}\n'
            )
    return "".join(lines).encode()


def _width(values: np.ndarray) -> int:
    return len(str(int(values.max()))) if values.size else 1


# [1000, 3] uint8: the three zero-padded ASCII digits of 0..999
_TRIPLES = np.frombuffer("".join(f"{i:03d}" for i in range(1000)).encode(), np.uint8).reshape(-1, 3)


def _digits(values: np.ndarray, width: int | None = None, pad: int = ord(" ")) -> np.ndarray:
    """uint8 [len(values), width]: decimal digits, right-aligned, padded with ``pad``.
    Three digits per table lookup: integer division is the slow part."""
    width = width or _width(values)
    groups = [_TRIPLES[values // 1000**g % 1000] for g in range(-(-width // 3) - 1, -1, -1)]
    digits = np.concatenate(groups, axis=1)[:, -width:]
    if pad != ord("0") and width > 1:
        powers = 10 ** np.arange(width - 1, 0, -1, dtype=np.int64)
        digits[:, :-1][values[:, None] < powers] = pad
    return digits


def _assemble(pieces: list, num_records: int) -> memoryview:
    widths = [len(p) if isinstance(p, bytes) else p.shape[1] for p in pieces]
    out = np.empty((num_records, sum(widths)), dtype=np.uint8)
    col = 0
    for piece, w in zip(pieces, widths):
        if isinstance(piece, bytes):
            out[:, col : col + w] = np.frombuffer(piece, dtype=np.uint8)
        else:
            out[:, col : col + w] = piece
        col += w
    return memoryview(out).cast("B")
