"""Figures: the oracle data agrees with the reference early exit, and every plot writes a readable PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from adadiff_export.bench import figures as F
from adadiff_export.model.schedule import VPSchedule

from conftest import tiny_model


@pytest.fixture(scope="module")
def data():
    m = tiny_model(uem_gain=20.0)
    return m, F.oracle_figure_data(m, VPSchedule(), threshold=0.5, n=6, steps=6, guidance=2.0, map_samples=2,
                                   map_steps=3)


def test_oracle_data_shapes_and_meaning(data):
    m, d = data
    assert d.layers_by_step.shape == (6, 6)
    assert d.layers_by_step.min() >= 1 and d.layers_by_step.max() <= m.depth
    assert d.full_layers == m.depth and d.exit_layers < m.depth  # the gain makes some samples exit early
    assert d.layer_error.shape == (5, m.depth) and np.all(d.layer_error[:, -1] == 0)
    assert d.u_maps.shape == (2, 3, 8, 8) and np.all((d.u_maps >= 0) & (d.u_maps <= 1))
    assert d.u_map_steps == [0, 2, 5]
    assert d.full_images.shape == d.exit_images.shape == (6, 1, 8, 8)


def test_threshold_zero_gives_identical_images():
    m = tiny_model(uem_gain=20.0)
    d = F.oracle_figure_data(m, VPSchedule(), threshold=0.0, n=3, steps=3, guidance=1.0, map_samples=1, map_steps=2)
    torch.testing.assert_close(d.exit_images, d.full_images)
    assert d.exit_layers == m.depth


def _png(path):
    img = Image.open(path)
    assert img.format == "PNG" and img.width > 300 and img.height > 200
    assert np.asarray(img.convert("L")).std() > 5  # not a blank canvas


def test_every_figure_writes_a_png(data, tmp_path):
    m, d = data
    paths = F.write_oracle_figures(d, tmp_path, m.depth)
    pts = [F.TradeoffPoint("uem", 0.1, 100.0, 5.0, 9.0), F.TradeoffPoint("uem", 0.2, 80.0, 7.0, 7.0),
           F.TradeoffPoint("static", 9, 90.0, 6.0, 9.0), F.TradeoffPoint("saturation", 0.05, 95.0, 6.5, 8.5)]
    paths["fig5"] = F.plot_tradeoff(pts, tmp_path / "fig5.png", full_ms=130.0, full_fd=4.8, full_layers=13.0)
    assert len(paths) == 5
    for p in paths.values():
        _png(p)
