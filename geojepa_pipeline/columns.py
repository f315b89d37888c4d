"""Arrow matrix columns <-> 2-D numpy arrays (token vectors, embeddings, positions).

Two encodings of an (N, w) matrix as a column: ``fixed_size_list<…>[w]`` (embeddings, positions), and
``float16_rows``' ``fixed_size_binary(2w)``, one value per row holding its w float16 numbers (tokens). Parquet
decodes a list column number by number (a repetition level each); the binary one is a row per value, so it
reads many times faster (``bench/embed.py`` prints both for a token shard), and equal rows (tag tokens repeat)
dictionary-encode to half the bytes.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

FLOAT16_ROWS = "float16_rows"  # field metadata b"geojepa:encoding" of a float16_rows column


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


def float16_rows_type(width: int) -> pa.DataType:
    """The Arrow type of a ``float16_rows`` column of ``width`` numbers per row."""
    return pa.binary(2 * width)


def float16_rows_field(name: str, width: int) -> pa.Field:
    """A schema field for ``float16_rows`` (its metadata says how to read the bytes)."""
    return pa.field(name, float16_rows_type(width), metadata={b"geojepa:encoding": FLOAT16_ROWS.encode(), b"geojepa:width": str(width).encode()})


def float16_rows(values: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(N, w) numbers -> a ``fixed_size_binary(2w)`` column: each row's w float16 values, little-endian, as one value."""
    v = np.ascontiguousarray(values, dtype="<f2")
    n, width = v.shape
    return pa.FixedSizeBinaryArray.from_buffers(float16_rows_type(width), n, [None, pa.py_buffer(v.reshape(-1).view(np.uint8))])


def matrix_to_numpy(col: pa.Array | pa.ChunkedArray, dtype=None) -> np.ndarray:
    """(N, w) array of a matrix column in either encoding: ``float16_rows`` (``fixed_size_binary(2w)``) or
    ``fixed_size_list<…>[w]`` (what tile_tokens wrote before schema version 2). ``dtype`` None keeps the stored
    type (float16 rows stay float16, zero-copy where Arrow allows); null rows read as zeros."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_fixed_size_binary(arr.type):
        if dtype is None:
            dtype = arr.type.value_type.to_pandas_dtype()
        return fixed_list_to_numpy(arr, dtype)
    width = arr.type.byte_width // 2
    out = np.frombuffer(arr.buffers()[1], "<f2", count=len(arr) * width, offset=arr.offset * 2 * width).reshape(-1, width)
    if arr.null_count:
        out = out.copy()
        out[np.asarray(arr.is_null())] = 0
    return out if dtype is None else out.astype(dtype)
