"""Which tokens each expert sees: route records joined with the token ids that the log
holds once per request (`prompt_token_ids` in 'request', `generated_token_ids` in
'request_end'). Streaming: a prompt position is counted when its record is read; a
generated position waits for its request's end, so memory holds the open requests'
prompts and generated rows, plus a dense [experts, vocabulary] int32 count per counted
layer (Qwen's 152k vocabulary x 60 experts: 36 MB), hence few layers: by default the
first logged one."""

import numpy as np
import pandas as pd

FLUSH = 1 << 20  # (row, expert, token) triples gathered before they are added in one go


class EndedEarly(Exception):
    """A route record read after its request's end was counted: read the log again with
    every end counted last."""


class TokenCounts:
    def __init__(self, layers: list[int], counted: list[int]):
        self.counted = [layer for layer in counted if layer in layers]
        self.index = np.full(len(layers), -1, np.int64)  # [layer slot] -> counted index, -1: not counted
        self.index[[layers.index(layer) for layer in self.counted]] = range(len(self.counted))
        self.table = np.zeros((len(counted), 0, 0), np.int32)  # [counted layer, expert, token]
        self.prompts: dict[tuple, np.ndarray] = {}  # (req_id, sample) -> prompt token ids
        self.waiting: dict[tuple, list] = {}  # (req_id, sample) -> [(slot, offset, ids)] after the prompt
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_size = 0
        self.seen = False  # any token ids in the log
        self.ended: set[tuple] = set()  # (req_id, sample) whose request_end was counted

    def request(self, record: dict) -> None:
        if "prompt_token_ids" in record:
            self.seen = True
            self.prompts[_key(record)] = np.asarray(record["prompt_token_ids"], np.int64)

    def request_end(self, record: dict) -> None:
        key = _key(record)
        if self.prompts.pop(key, None) is not None:
            self.ended.add(key)
        rows = self.waiting.pop(key, [])
        generated = np.asarray(record.get("generated_token_ids", ()), np.int64)
        if not rows or not len(generated):
            return
        slot, offset, ids = (np.concatenate(part) for part in zip(*rows))
        known = offset < len(generated)
        self._count(slot[known], ids[known], generated[offset[known]])

    def routes(self, names: list, samples: np.ndarray, row_req: np.ndarray, token_idx: np.ndarray,
               slot: np.ndarray, ids: np.ndarray) -> None:
        """Distinct route records of one chunk: request index per row into ``names``."""
        mine = self.index[slot] >= 0
        if not self.prompts or not mine.any():
            return
        samples, row_req, token_idx, slot, ids = samples[mine], row_req[mine], token_idx[mine], slot[mine], ids[mine]
        group = row_req * 2**20 + samples
        order = np.argsort(group, kind="stable")
        cuts = np.flatnonzero(np.diff(group[order])) + 1
        for rows in np.split(order, cuts):
            key = (names[row_req[rows[0]]], int(samples[rows[0]]))
            prompt = self.prompts.get(key)
            if prompt is None:
                if key in self.ended:
                    raise EndedEarly(key)
                continue
            pos = token_idx[rows]
            inside = pos < len(prompt)
            self._count(slot[rows][inside], ids[rows][inside], prompt[pos[inside]])
            after = rows[~inside]
            if len(after):
                self.waiting.setdefault(key, []).append((slot[after], token_idx[after] - len(prompt), ids[after]))

    def _count(self, slot: np.ndarray, ids: np.ndarray, tokens: np.ndarray) -> None:
        k = ids.shape[1]
        self.pending.append((np.repeat(self.index[slot], k), ids.ravel(), np.repeat(tokens, k)))
        self.pending_size += len(slot) * k
        if self.pending_size >= FLUSH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        index, expert, token = (np.concatenate(part) for part in zip(*self.pending))
        self.pending, self.pending_size = [], 0
        _, experts, vocab = self.table.shape
        if expert.max() >= experts or token.max() >= vocab:
            grown = np.zeros((len(self.counted), max(experts, int(expert.max()) + 1),
                              max(vocab, int(token.max()) + 1)), np.int32)
            grown[:, :experts, :vocab] = self.table
            self.table = grown
        cells, counts = np.unique(np.ravel_multi_index((index, expert, token), self.table.shape),
                                  return_counts=True)  # a sort: several times faster than np.add.at
        self.table.reshape(-1)[cells] += counts.astype(np.int32)

    def frame(self) -> pd.DataFrame:
        """Nonzero counts, one row each, by layer, expert, token: int32 columns (16 bytes
        a row), gathered an expert's row at a time (no index arrays over the whole table)."""
        self.flush()
        parts = []
        for index, layer in enumerate(self.counted):
            for expert, row in enumerate(self.table[index]):
                token = np.flatnonzero(row).astype(np.int32)
                parts.append((np.full(len(token), layer, np.int32), np.full(len(token), expert, np.int32), token,
                              row[token]))
        columns = [np.concatenate(c) for c in zip(*parts)] if parts else [np.zeros(0, np.int32)] * 4
        return pd.DataFrame(dict(zip(("layer", "expert", "token", "count"), columns)), copy=False)


def _key(record: dict) -> tuple:
    return (str(record["req_id"]), record.get("sample") or 0)


def decoder(tokenizer: str | None, model_id: str | None):
    """token id -> text with ``tokenizer`` (a path or hub id), else with the logged
    model's own files when they are on this machine; None if neither loads."""
    from pathlib import Path

    source = tokenizer or (model_id if model_id and Path(model_id).is_dir() else None)
    if source is None:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, ImportError) as e:
        if tokenizer:
            raise SystemExit(f"--tokenizer {tokenizer}: cannot load a tokenizer ({e})") from None
        return None
    return lambda token: tok.decode([token])
