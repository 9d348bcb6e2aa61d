"""A checksum of a token-reward cache's stored rows, checked when the cache is loaded.

The fingerprint covers the inputs of a build; this covers its output: a cache whose Arrow data
was changed in place (a flipped bit, a bad copy) with its length and footer intact still reads,
and would train on those values without it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def table_checksum(table: pa.Table) -> str:
    """sha256 over every column of ``table``: its name and type, per list column the row
    lengths and the flattened values, else the values. Independent of how the table is cut
    into record batches (the cache is hashed in memory when saved, and as loaded from disk)."""
    total = hashlib.sha256()
    for name in sorted(table.column_names):
        column = table.column(name)
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for chunk in column.chunks:
            if pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
                counts = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
                lengths.update(np.ascontiguousarray(counts, np.int64).tobytes())
                chunk = chunk.flatten()
            values.update(np.ascontiguousarray(chunk.to_numpy(zero_copy_only=False)).tobytes())
        total.update(f"{name}\0{column.type}\0".encode())
        total.update(lengths.digest() + values.digest())
    return total.hexdigest()
