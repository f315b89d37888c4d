"""columns: the two matrix encodings read back exactly, through Parquet, sliced and with null rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geojepa_pipeline.columns import float16_rows, float16_rows_field, matrix_to_numpy, numpy_to_fixed_list


def test_float16_rows_round_trip_through_parquet(tmp_path):
    x = np.random.default_rng(0).normal(size=(300, 7)).astype(np.float16)
    schema = pa.schema([float16_rows_field("new", 7), ("old", pa.list_(pa.float16(), 7))])
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table([float16_rows(x), numpy_to_fixed_list(x, pa.float16())], schema=schema), path, row_group_size=64)
    t = pq.read_table(path)
    assert t.column("new").num_chunks > 1 and t.schema.field("new").metadata[b"geojepa:encoding"] == b"float16_rows"
    for name in ("new", "old"):  # tokens written before schema version 2 read the same
        got = matrix_to_numpy(t.column(name))
        assert got.dtype == np.float16 and np.array_equal(got, x)
        assert np.array_equal(matrix_to_numpy(t.column(name), np.float32), x.astype(np.float32))
        assert np.array_equal(matrix_to_numpy(t.column(name).combine_chunks().slice(70, 5)), x[70:75])  # an offset array
    taken = matrix_to_numpy(t.column("new").take(pa.array([5, 299, 0])))
    assert np.array_equal(taken, x[[5, 299, 0]])


def test_float16_rows_null_rows_read_as_zeros():
    x = np.ones((4, 3), np.float16)
    arr = pa.FixedSizeBinaryArray.from_buffers(float16_rows(x).type, 4, [pa.array([True, False, True, True]).buffers()[1],
                                                                        float16_rows(x).buffers()[1]], null_count=1)
    got = matrix_to_numpy(arr)
    assert got[1].tolist() == [0, 0, 0] and (got[[0, 2, 3]] == 1).all()
