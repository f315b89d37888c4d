"""PolygonGNN input graphs and model: frames, features, edges, pooling, pretraining signal."""

from __future__ import annotations

import numpy as np
import shapely
import torch

from geojepa_pipeline.tokenizers.geometry import (
    PolygonGNNConfig, PolygonGNN, PretrainConfig, geometry_graphs, pretrain, ridge_r2, shape_targets,
)

from ..geo.test_minbox import ROUTE_PIECE_WKT


def test_square_graph_in_its_min_box_frame():
    g = geometry_graphs(np.array([shapely.box(100, 100, 110, 110)], dtype=object))
    assert g.x.shape == (4, 9) and g.n_graphs == 1 and (g.batch == 0).all()
    xy = g.x[:, :2]
    assert np.allclose(np.sort(xy[:, 0]), [0, 0, 1, 1], atol=1e-6) and np.allclose(np.sort(xy[:, 1]), [0, 0, 1, 1], atol=1e-6)
    assert np.allclose(np.abs(g.x[:, 3]), 1.0, atol=1e-6)  # 90° turns: |sin| = 1
    assert (g.x[:, 7] == 1).all() and g.x[0, 8] == np.float32(np.log1p(10) / np.log(301))
    assert g.edge_index.shape == (2, 8)  # a 4-cycle, both directions
    assert np.allclose(g.edge_attr[:, 0], 1.0, atol=1e-6)


def test_rotation_and_translation_do_not_change_the_graph():
    poly = shapely.Polygon([(0, 0), (40, 0), (40, 10), (10, 10), (10, 25), (0, 25)])
    moved = shapely.affinity.translate(shapely.affinity.rotate(poly, 33, origin=(0, 0)), 120, 80)
    a = geometry_graphs(np.array([poly], dtype=object))
    b = geometry_graphs(np.array([moved], dtype=object))
    model = PolygonGNN()
    ta, tb = model.encode(a), model.encode(b)
    assert np.allclose(np.sort(np.abs(a.edge_attr[:, 0])), np.sort(np.abs(b.edge_attr[:, 0])), atol=1e-4)
    assert np.allclose(np.sort(a.x[:, 3]), np.sort(b.x[:, 3]), atol=1e-4)
    assert np.allclose(a.x, b.x, atol=1e-4)  # the canonical min-box frame undoes the move
    assert np.abs(ta - tb).max() < 1e-3 * np.abs(ta).max() + 1e-4


def test_points_small_pieces_lines_and_multipart():
    geoms = np.array([
        shapely.Point(5, 5),
        shapely.box(0, 0, 0.2, 0.1),  # smaller than 0.5 m: one node
        shapely.LineString([(0, 0), (30, 0), (30, 40)]),
        shapely.MultiPolygon([shapely.box(0, 0, 10, 10), shapely.box(20, 0, 30, 10)]),
        shapely.Polygon(shapely.box(0, 0, 20, 20).exterior.coords, [shapely.box(5, 5, 15, 15).exterior.coords]),
    ], dtype=object)
    g = geometry_graphs(geoms)
    nodes = np.bincount(g.batch, minlength=5)
    assert list(nodes) == [1, 1, 3, 8, 8]
    point = g.x[g.batch == 0][0]
    assert point[0] == point[1] == 0.5 and point[5] == 1  # a defined input: centre, point flag
    small = g.x[g.batch == 1][0]
    assert small[7] == 1 and small[0] == 0.5  # polygon flag kept
    line = g.x[g.batch == 2]
    assert line[:, 4].tolist() == [1, 0, 1]  # the ends are flagged
    owner = g.batch[g.edge_index[0]]
    assert (g.batch[g.edge_index[1]] == owner).all()  # no edge crosses pieces
    edges = np.bincount(owner, minlength=5)
    assert edges[0] == edges[1] == 0 and edges[2] == 4
    assert edges[3] == 8 + 8 + 2 and edges[4] == 8 + 8 + 2  # two 4-cycles + the link between parts (rings)


def test_a_piece_that_geos_boxes_wrongly_lies_in_its_frame():
    g = geometry_graphs(np.array([shapely.from_wkt(ROUTE_PIECE_WKT)], dtype=object))
    assert g.n_graphs == 1 and len(g.x) > 1
    assert g.x[:, :2].min() >= -1e-5 and g.x[:, :2].max() <= 1 + 1e-5  # GEOS's rectangle put vertices far outside


def test_tokens_are_sum_pooled_per_piece():
    geoms = np.array([shapely.box(0, 0, 10, 10), shapely.box(0, 0, 10, 10), shapely.box(0, 0, 30, 5)], dtype=object)
    torch.manual_seed(0)
    tok = PolygonGNN(PolygonGNNConfig(dim=16, hidden=16, n_blocks=2)).encode(geometry_graphs(geoms))
    assert tok.shape == (3, 16)
    assert np.allclose(tok[0], tok[1], atol=1e-5) and not np.allclose(tok[0], tok[2], atol=1e-3)


def test_short_pretraining_lowers_the_loss_and_probes_beat_chance():
    rng = np.random.default_rng(0)
    w, h = rng.uniform(2, 60, 600), rng.uniform(2, 60, 600)
    geoms = np.array([shapely.affinity.rotate(shapely.box(0, 0, a, b), rng.uniform(0, 180)) for a, b in zip(w, h)], dtype=object)
    model, losses = pretrain(geoms[:500], PolygonGNNConfig(dim=32, hidden=32, n_blocks=2), PretrainConfig(steps=60, batch=128))
    assert np.mean(losses[-10:]) < np.mean(losses[:5])
    targets = shape_targets(geoms[500:])
    tokens = model.encode(geometry_graphs(geoms[500:])).astype(np.float64)
    assert ridge_r2(tokens, targets["log_area_m2"]) > 0.5
    assert ridge_r2(tokens, targets["log_elongation"]) > 0.3
