"""Tag vocabulary policy, text template and the fallback lookup (no model needed)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from geojepa_pipeline.tokenizers.tags import (
    TagVocabulary, open_keys, pair_text, pairs_table, parent_keys, vocabulary,
)


def test_pair_text_template():
    assert pair_text("building", "yes") == "building = yes"
    assert pair_text("addr:street", "") == "addr street"
    assert pair_text("landuse", "village_green") == "landuse = village green"


def test_parent_keys():
    assert parent_keys("parking:lane:both") == ["parking:lane", "parking"]
    assert parent_keys("building") == []


def test_open_keys_by_name_and_by_data():
    stats = {
        "name": (5, 5, list("abcde")),  # by name, whatever the data says
        "addr:housenumber": (3, 90, ["1", "2", "3"]),
        "shop": (95, 515, [f"s{i}" for i in range(95)]),  # many values, but they repeat: categorical
        "uic_name_like": (151, 297, [f"x{i}" for i in range(151)]),  # values rarely repeat: open
        "ele": (61, 328, [str(400 + i) for i in range(61)]),  # numbers: open
        "building": (28, 3747, [f"b{i}" for i in range(28)]),
        "few_unique": (12, 12, [f"u{i}" for i in range(12)]),  # unique but too few to judge: kept
    }
    assert open_keys(stats) == {"name", "addr:housenumber", "uic_name_like", "ele"}


def test_vocabulary_collapses_open_keys_and_adds_fallbacks():
    pairs = [("building", "yes"), ("name", "Vaduz"), ("name", "Schaan"), ("parking:lane:both", "parallel")]
    vocab = vocabulary(pairs, {"name"})
    assert vocab == sorted({("building", "yes"), ("building", ""), ("name", ""), ("parking:lane:both", "parallel"),
                            ("parking:lane:both", ""), ("parking:lane", ""), ("parking", "")})


def test_lookup_falls_back_and_tag_tokens_sum_pairs():
    keys = ["building", "building", "name", "parking"]
    values = ["yes", "", "", ""]
    vectors = np.eye(4, 8, dtype=np.float32)  # one-hot per entry
    vocab = TagVocabulary.from_table(pairs_table("m", keys, values, vectors), {"name"})
    row = lambda k, v: int(np.argmax(vocab.vectors[vocab.row_of(k, v)]))  # noqa: E731
    assert row("building", "yes") == 0
    assert row("building", "church") == 1  # unknown value -> (key, "")
    assert row("name", "Vaduz") == 2  # open key -> (key, "")
    assert row("parking:lane:left", "no") == 3  # unknown key -> parent key
    assert vocab.row_of("amenity", "bench") == -1
    tags = pa.array([[("building", "yes"), ("name", "X")], [], [("amenity", "bench")]], pa.map_(pa.string(), pa.string()))
    tokens = vocab.tag_tokens(tags)
    assert tokens.shape == (3, 8)
    assert np.array_equal(tokens[0], vectors[0] + vectors[2]) and not tokens[1].any() and not tokens[2].any()
