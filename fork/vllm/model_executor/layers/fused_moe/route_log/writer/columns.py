# SPDX-License-Identifier: Apache-2.0
"""The parquet route log: route records as columns in rolling parquet files; every
other record stays a JSONL line, in records.jsonl beside them.

    LOG/records.jsonl               meta, request, request_end, gap, part, end
    LOG/routes/part-000000.parquet  route records, one file per part

A part is written under a hidden name and renamed once whole, so readers (ours, and
DuckDB, Spark or Dask over LOG/routes/*.parquet) never see half a file. A part closes
at PART_ROWS rows, PART_SECONDS after its first row, whenever no request is open,
and when the log ends; a 'part' record in records.jsonl then names it. A crash loses
the open part's rows only. Loaded by the writer process only (numpy and pyarrow).
"""

import glob
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..format import PARQUET_OPTIONS, PARQUET_ROUTES, PART_ROWS, PART_SECONDS, part_name, route_schema

class RouteColumns:
    """Route rows gathered for the open part; ``roll`` writes it."""

    def __init__(self, directory: str, layers: list[int], top_k: int, num_experts: int):
        self.routes = os.path.join(directory, PARQUET_ROUTES)
        for stale in glob.glob(os.path.join(self.routes, "*part-*.parquet*")):
            os.remove(stale)  # a previous run's: the engine holds the log's lock
        self.layers = np.asarray(layers, np.int16)
        self.top_k = top_k
        self.schema = route_schema(num_experts)
        self.ids_dtype = self.schema.field("topk_ids").type.value_type.to_pandas_dtype()
        self.names: dict[int, tuple[str, int | None]] = {}  # slot -> (req_id, sample)
        self.batches: list[pa.RecordBatch] = []
        self.rows = 0
        self.opened = 0.0  # when the open part got its first row
        self.parts = 0

    def bind(self, slot: int, req_id: str, sample: int | None) -> None:
        self.names[slot] = (req_id, sample)

    def add(self, ids: np.ndarray, weights: np.ndarray, slots: np.ndarray, positions: np.ndarray,
            cached: bool) -> None:
        """ids int32 / weights float32 [n, L, k]; slots, positions [n]."""
        n, num_layers, k = ids.shape
        if n == 0:
            return
        owners, inverse = np.unique(slots, return_inverse=True)
        names = [self.names[int(s)] for s in owners]
        sample = np.array([-1 if s is None else s for _, s in names], np.int32)[inverse]
        columns = [
            pa.DictionaryArray.from_arrays(pa.array(np.repeat(inverse.astype(np.int32), num_layers)),
                                           pa.array([name for name, _ in names], pa.string())),
            pa.array(np.repeat(sample, num_layers), pa.int32(), mask=np.repeat(sample < 0, num_layers)),
            pa.array(np.repeat(positions.astype(np.int32), num_layers)),
            pa.array(np.tile(self.layers, n)),
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1).astype(self.ids_dtype)), k),
            pa.FixedSizeListArray.from_arrays(pa.array(weights.reshape(-1)), k),
            pa.array(np.full(n * num_layers, cached)),
        ]
        columns[4:6] = [c.cast(self.schema.field(i).type) for c, i in zip(columns[4:6], (4, 5))]
        self.batches.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.opened = self.opened if self.rows else time.monotonic()
        self.rows += n * num_layers

    def due(self) -> bool:
        return self.rows >= PART_ROWS or (self.rows > 0 and time.monotonic() - self.opened >= PART_SECONDS)

    def roll(self) -> dict | None:
        """Writes the open part, if it has rows; returns its 'part' record."""
        if not self.rows:
            return None
        name = part_name(self.parts)
        hidden = os.path.join(self.routes, f".{name}.tmp")
        table = pa.Table.from_batches(self.batches, self.schema)
        # By layer: each layer's ids (and their popularity) compress on their own.
        table = table.take(pa.array(np.argsort(table["layer"].to_numpy(), kind="stable")))
        pq.write_table(table, hidden, **PARQUET_OPTIONS)
        os.rename(hidden, os.path.join(self.routes, name))
        record = {"type": "part", "file": f"{PARQUET_ROUTES}/{name}", "rows": self.rows,
                  "bytes": os.path.getsize(os.path.join(self.routes, name)),
                  "closed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.batches, self.rows = [], 0
        self.parts += 1
        return record
