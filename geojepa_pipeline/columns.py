"""Arrow fixed-size-list columns <-> 2-D numpy arrays (token vectors, embeddings, positions)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fixed_list_to_numpy(col: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """(N, width) array of a ``fixed_size_list<…>[width]`` column (null rows read as zeros)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype).reshape(-1, width)


def numpy_to_fixed_list(values: np.ndarray, value_type: pa.DataType, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<value_type>[D]`` column from (N, D) ``values``; ``mask`` (N,) bool marks null rows."""
    n, width = values.shape
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), value_type)
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=None if mask is None else pa.array(mask))
