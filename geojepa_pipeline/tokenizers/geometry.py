"""Geometry tokens: a PolygonGNN over each piece's vertex graph, in the piece's min-box frame.

Input graph of one piece (``geometry_graphs``)
----------------------------------------------
- **Frame.** The piece's minimum rotated rectangle (``geo.minbox.min_rect_corners_m``; not the
  ``minbox`` column, whose corners are clamped to the tile): x along its longer side, pointing east (north if the
  side is vertical), y that axis turned +90°, origin at the rectangle's corner with the
  smallest coordinates; divided by the longer side, so the shape keeps its aspect ratio and
  lies in [0, 1] x [0, 1]. Rotating a piece (by less than its side's turn past north) or
  moving it leaves its graph unchanged.
- **Nodes** are the vertices (rings drop their closing vertex). Features (``NODE_FEATURES`` = 9):
  x, y in the frame; cos, sin of the turning angle at the vertex (0, 0 at line ends);
  is a line end; one-hot point / line / polygon; log(1 + longer min-box side in metres) / log(301).
- **Edges** join consecutive vertices of each ring (cyclic) and polyline, both directions.
  Multi-part pieces (relations, multipolygons, collections) also join each part's first
  vertex to the next part's: the members of a relation see each other. Edge features
  (``EDGE_FEATURES`` = 3): length d_ij and the offset (dx, dy), in frame units.
- **Points and very small pieces** (longer min-box side < 0.5 m) are one node at (0.5, 0.5)
  with no edges and their type flag; the scale feature still says how small they are.
- Rings and lines with more than ``MAX_VERTICES_PER_PART`` vertices are subsampled evenly.

Model (``PolygonGNN``)
----------------------
Input projection, ``n_blocks`` interaction blocks (message MLP over [h_j, e_ji] summed at i,
then an update MLP, residual), the blocks' outputs concatenated, projected to ``dim`` and
sum-pooled per piece: (P, dim). Written with ``torch_geometric.nn.MessagePassing`` and
``torch_geometric.utils.scatter``, which need no compiled extras (no pyg-lib).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import shapely
import torch
from torch import nn

from ..geo.minbox import min_rect_corners_m

NODE_FEATURES = 9
EDGE_FEATURES = 3
MAX_VERTICES_PER_PART = 64
SMALL_PIECE_M = 0.5
_GEOM_TYPE = {0: 0, 4: 0, 1: 1, 2: 1, 5: 1, 3: 2, 6: 2}  # shapely type id -> point / line / polygon


@dataclass
class GeometryGraphs:
    """A batch of piece graphs. Shapes: x (N, 9), edge_index (2, E), edge_attr (E, 3), batch (N,)."""

    x: np.ndarray
    edge_index: np.ndarray
    edge_attr: np.ndarray
    batch: np.ndarray
    n_graphs: int

    def tensors(self):
        return (torch.from_numpy(self.x), torch.from_numpy(self.edge_index), torch.from_numpy(self.edge_attr),
                torch.from_numpy(self.batch), self.n_graphs)


def _subsample(coords: np.ndarray, part: np.ndarray, max_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep at most ``max_n`` evenly spaced vertices of each part (coords sorted by part)."""
    counts = np.bincount(part)
    if counts.size == 0 or counts.max() <= max_n:
        return coords, part
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    keep = np.ones(len(coords), bool)
    for p in np.flatnonzero(counts > max_n):
        idx = starts[p] + np.round(np.linspace(0, counts[p] - 1, max_n)).astype(np.int64)
        keep[starts[p]:starts[p] + counts[p]] = False
        keep[idx] = True
    return coords[keep], part[keep]


def geometry_graphs(geoms: np.ndarray, max_vertices: int = MAX_VERTICES_PER_PART) -> GeometryGraphs:
    """Vertex graphs of pieces.

    Args:
        geoms: (P,) shapely geometries in metres (tile-local or any planar CRS).
    """
    n = len(geoms)
    corners = min_rect_corners_m(geoms)
    side_u, side_v = corners[:, 1] - corners[:, 0], corners[:, 3] - corners[:, 0]
    len_u, len_v = np.linalg.norm(side_u, axis=1), np.linalg.norm(side_v, axis=1)
    long_side = np.maximum(len_u, len_v)
    # canonical frame: x along the longer side, pointing east (or north if vertical); y = x turned +90°
    long_vec = np.where((len_u >= len_v)[:, None], side_u, side_v)
    unit_u = long_vec / np.maximum(long_side, 1e-12)[:, None]
    unit_u[long_side < 1e-9] = [1.0, 0.0]
    flip = (unit_u[:, 0] < -1e-12) | ((np.abs(unit_u[:, 0]) <= 1e-12) & (unit_u[:, 1] < 0))
    unit_u[flip] *= -1
    unit_v = np.stack([-unit_u[:, 1], unit_u[:, 0]], 1)
    # origin: the corner with the smallest coordinates in that frame, so the piece lies in [0, 1]²
    proj_u = np.einsum("pkc,pc->pk", corners, unit_u)
    proj_v = np.einsum("pkc,pc->pk", corners, unit_v)
    origin = proj_u.min(1)[:, None] * unit_u + proj_v.min(1)[:, None] * unit_v
    scale_feat = (np.log1p(long_side) / math.log(301.0)).astype(np.float32)
    type_ids = shapely.get_type_id(geoms)
    kind = np.array([_GEOM_TYPE.get(int(t), 1) for t in type_ids], np.int64)
    small = (long_side < SMALL_PIECE_M) | (kind == 0) | shapely.is_empty(geoms)

    # parts -> rings / lines -> vertices
    parts, part_owner = shapely.get_parts(geoms[~small], return_index=True)
    part_owner = np.flatnonzero(~small)[part_owner]
    part_dim = shapely.get_dimensions(parts)
    poly = part_dim == 2
    rings, ring_of = shapely.get_rings(parts[poly], return_index=True)
    lines = parts[part_dim == 1]
    chains = np.concatenate([rings, lines])
    chain_owner = np.concatenate([part_owner[poly][ring_of], part_owner[part_dim == 1]])
    chain_closed = np.concatenate([np.ones(len(rings), bool), np.zeros(len(lines), bool)])
    order = np.argsort(chain_owner, kind="stable")
    chains, chain_owner, chain_closed = chains[order], chain_owner[order], chain_closed[order]
    coords, chain = shapely.get_coordinates(chains, return_index=True)
    if len(coords):
        # drop each ring's closing vertex
        last = np.r_[np.flatnonzero(np.diff(chain)), len(chain) - 1]
        drop = np.zeros(len(coords), bool)
        drop[last[chain_closed[chain[last]]]] = True
        coords, chain = coords[~drop], chain[~drop]
        coords, chain = _subsample(coords, chain, max_vertices)
    # chains with < 2 vertices left are not drawable: their pieces become single nodes
    counts = np.bincount(chain, minlength=len(chains))
    ok_chain = counts >= 2
    keep_v = ok_chain[chain] if len(chain) else np.zeros(0, bool)
    coords, chain = coords[keep_v], chain[keep_v]
    has_chain = np.zeros(n, bool)
    has_chain[chain_owner[ok_chain]] = True
    single = ~has_chain

    # frame coordinates of chain vertices
    owner_v = chain_owner[chain]
    rel = coords - origin[owner_v]
    fx = (rel * unit_u[owner_v]).sum(1) / np.maximum(long_side[owner_v], 1e-9)
    fy = (rel * unit_v[owner_v]).sum(1) / np.maximum(long_side[owner_v], 1e-9)
    nv = len(coords)
    # neighbours along each chain
    first = np.r_[0, np.flatnonzero(np.diff(chain)) + 1] if nv else np.zeros(0, np.int64)
    chain_start = np.zeros(len(chains), np.int64)
    chain_len = np.bincount(chain, minlength=len(chains))
    chain_start[chain[first]] = first  # chain ids of the runs' first vertices
    pos = np.arange(nv) - chain_start[chain]
    ln = chain_len[chain]
    closed_v = chain_closed[chain]
    nxt = np.where(pos + 1 < ln, np.arange(nv) + 1, np.where(closed_v, chain_start[chain], -1))
    prv = np.where(pos > 0, np.arange(nv) - 1, np.where(closed_v, chain_start[chain] + ln - 1, -1))
    # turning angle at each vertex
    xy = np.stack([fx, fy], 1)
    a = xy - xy[np.where(prv >= 0, prv, np.arange(nv))]
    b = xy[np.where(nxt >= 0, nxt, np.arange(nv))] - xy
    ang = np.arctan2(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0], (a * b).sum(1))
    end = (prv < 0) | (nxt < 0)
    cos_t, sin_t = np.where(end, 0.0, np.cos(ang)), np.where(end, 0.0, np.sin(ang))

    # node table: chain vertices, then one node per single-node piece; sorted by piece
    single_idx = np.flatnonzero(single)
    node_owner = np.concatenate([owner_v, single_idx])
    onehot = np.eye(3, dtype=np.float32)[kind[node_owner]]
    x = np.zeros((len(node_owner), NODE_FEATURES), np.float32)
    x[:nv, 0], x[:nv, 1], x[:nv, 2], x[:nv, 3], x[:nv, 4] = fx, fy, cos_t, sin_t, end
    x[nv:, 0:2] = 0.5
    x[:, 5:8] = onehot
    x[:, 8] = scale_feat[node_owner]

    # edges: chain neighbours (both directions) + links between consecutive chains of a piece
    src = np.flatnonzero(nxt >= 0)
    e_src, e_dst = np.concatenate([src, nxt[src]]), np.concatenate([nxt[src], src])
    if nv:
        chain_first = chain_start[ok_chain]
        owners = chain_owner[ok_chain]
        same = owners[1:] == owners[:-1]
        a_, b_ = chain_first[:-1][same], chain_first[1:][same]
        e_src, e_dst = np.concatenate([e_src, a_, b_]), np.concatenate([e_dst, b_, a_])
    order_nodes = np.argsort(node_owner, kind="stable")
    new_index = np.empty_like(order_nodes)
    new_index[order_nodes] = np.arange(len(order_nodes))
    x = x[order_nodes]
    batch = node_owner[order_nodes]
    d = xy[e_dst] - xy[e_src] if len(e_src) else np.zeros((0, 2))
    edge_attr = np.column_stack([np.linalg.norm(d, axis=1), d]).astype(np.float32) if len(e_src) else np.zeros((0, 3), np.float32)
    edge_index = np.stack([new_index[e_src], new_index[e_dst]]).astype(np.int64) if len(e_src) else np.zeros((2, 0), np.int64)
    return GeometryGraphs(x, edge_index, edge_attr, batch.astype(np.int64), n)


@dataclass
class PolygonGNNConfig:
    """The geometry encoder's architecture (stored in the geometry_encoder dataset's config.json)."""

    dim: int = 64  # geometry token size
    hidden: int = 64
    n_blocks: int = 3

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, o))


def _interaction_block_class():
    from torch_geometric.nn import MessagePassing

    class InteractionBlock(MessagePassing):
        """h_i <- h_i + U([h_i, sum_j M([h_j, e_ji])])."""

        def __init__(self, hidden: int):
            super().__init__(aggr="add")
            self.message_mlp = _mlp(hidden + EDGE_FEATURES, hidden, hidden)
            self.update_mlp = _mlp(2 * hidden, hidden, hidden)
            self.norm = nn.LayerNorm(hidden)

        def forward(self, h, edge_index, edge_attr):
            agg = self.propagate(edge_index, h=h, edge_attr=edge_attr)
            return self.norm(h + self.update_mlp(torch.cat([h, agg], dim=-1)))

        def message(self, h_j, edge_attr):
            return self.message_mlp(torch.cat([h_j, edge_attr], dim=-1))

    return InteractionBlock


class PolygonGNN(nn.Module):
    """Piece graphs -> (P, dim) geometry tokens (see the module docstring)."""

    def __init__(self, config: PolygonGNNConfig = PolygonGNNConfig()):
        super().__init__()
        self.config = config
        block = _interaction_block_class()
        self.inp = nn.Linear(NODE_FEATURES, config.hidden)
        self.blocks = nn.ModuleList([block(config.hidden) for _ in range(config.n_blocks)])
        self.out = nn.Linear(config.hidden * config.n_blocks, config.dim)

    def forward(self, x, edge_index, edge_attr, batch, n_graphs: int) -> torch.Tensor:
        from torch_geometric.utils import scatter

        h = self.inp(x)
        outs = []
        for blk in self.blocks:
            h = blk(h, edge_index, edge_attr)
            outs.append(h)
        node_out = self.out(torch.cat(outs, dim=-1))
        return scatter(node_out, batch, dim=0, dim_size=n_graphs, reduce="sum")

    @torch.no_grad()
    def encode(self, graphs: GeometryGraphs) -> np.ndarray:
        """(P, dim) float32 tokens, in eval mode."""
        self.eval()
        return self(*graphs.tensors()).numpy()


# ---- self-supervised pretraining ------------------------------------------------------------
#
# Objective: contrastive (InfoNCE, SimCLR-style). Two views of each piece, one lightly jittered,
# one simplified (GEOS, tolerance up to 5 % of its longer side) with fewer vertices allowed and
# jittered; a small projection head maps both views' tokens to a unit sphere and the loss asks
# each view to pick its partner among the batch. What survives simplification and jitter is
# the shape: size, elongation, outline, holes, type. The head is dropped after training.

@dataclass
class PretrainConfig:
    steps: int = 300
    batch: int = 256
    lr: float = 2e-3
    temperature: float = 0.1
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _view(geoms: np.ndarray, rng: np.random.Generator, simplify: bool) -> GeometryGraphs:
    if simplify:
        corners = min_rect_corners_m(geoms)
        long_side = np.maximum(np.linalg.norm(corners[:, 1] - corners[:, 0], axis=1),
                               np.linalg.norm(corners[:, 3] - corners[:, 0], axis=1))
        tol = rng.uniform(0.0, 0.05, len(geoms)) * long_side
        simplified = shapely.simplify(geoms, tol, preserve_topology=True)
        geoms = np.where(shapely.is_empty(simplified), geoms, simplified)
        g = geometry_graphs(geoms, max_vertices=int(rng.integers(8, MAX_VERTICES_PER_PART + 1)))
    else:
        g = geometry_graphs(geoms)
    g.x[:, :2] += rng.normal(0, 0.01, (len(g.x), 2)).astype(np.float32)
    g.edge_attr += rng.normal(0, 0.005, g.edge_attr.shape).astype(np.float32)
    return g


def pretrain(geoms: np.ndarray, config: PolygonGNNConfig = PolygonGNNConfig(),
             train: PretrainConfig = PretrainConfig(), log=None) -> tuple[PolygonGNN, list[float]]:
    """Train a PolygonGNN on ``geoms`` (P,) with the contrastive objective above; returns (model, loss per step)."""
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = PolygonGNN(config)
    head = nn.Sequential(nn.Linear(config.dim, config.dim), nn.SiLU(), nn.Linear(config.dim, 32))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=train.lr, weight_decay=1e-4)
    losses: list[float] = []
    n = len(geoms)
    batch = min(train.batch, n)
    model.train()
    for step in range(train.steps):
        idx = rng.choice(n, batch, replace=False)
        za = nn.functional.normalize(head(model(*_view(geoms[idx], rng, False).tensors())), dim=-1)
        zb = nn.functional.normalize(head(model(*_view(geoms[idx], rng, True).tensors())), dim=-1)
        logits = za @ zb.T / train.temperature
        target = torch.arange(batch)
        loss = 0.5 * (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step % 50 == 0 or step == train.steps - 1):
            log(f"geometry encoder step {step + 1}/{train.steps}: InfoNCE {losses[-1]:.3f} (chance {math.log(batch):.3f})")
    model.eval()
    return model, losses


def shape_targets(geoms: np.ndarray) -> dict[str, np.ndarray]:
    """Per piece: log area (m²), log elongation (min-box long / short side), log vertex count."""
    corners = min_rect_corners_m(geoms)
    a = np.linalg.norm(corners[:, 1] - corners[:, 0], axis=1)
    b = np.linalg.norm(corners[:, 3] - corners[:, 0], axis=1)
    return {
        "log_area_m2": np.log1p(shapely.area(geoms)),
        "log_elongation": np.log((np.maximum(a, b) + 0.1) / (np.minimum(a, b) + 0.1)),
        "log_vertices": np.log(shapely.get_num_coordinates(geoms).astype(np.float64)),
    }


def ridge_r2(features: np.ndarray, target: np.ndarray, seed: int = 0, alpha: float = 1.0) -> float:
    """Test R² of a ridge regression (70/30 split): 0 is chance (predicting the mean), 1 is perfect."""
    from ..evaluate.probes import ridge_r2 as fit_and_score

    order = np.random.default_rng(seed).permutation(len(target))
    tr, te = order[: int(0.7 * len(target))], order[int(0.7 * len(target)):]
    return fit_and_score(features[tr], target[tr], features[te], target[te], alpha)


def probe(model: PolygonGNN, geoms: np.ndarray, seed: int = 0) -> dict[str, dict[str, float]]:
    """Linear-probe R² of shape properties from the tokens of ``model`` and of the same architecture untrained."""
    torch.manual_seed(seed + 1)
    untrained = PolygonGNN(model.config)
    graphs = geometry_graphs(geoms)
    emb = {"pretrained": model.encode(graphs), "untrained": untrained.encode(graphs)}
    out = {}
    for name, target in shape_targets(geoms).items():
        out[name] = {k: round(ridge_r2(v.astype(np.float64), target, seed), 4) for k, v in emb.items()}
        out[name]["chance"] = 0.0
    return out
