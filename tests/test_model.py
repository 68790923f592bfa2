"""U-ViT with UEMs: shapes, wiring, piecewise execution equals the whole pass, UEM input is detached."""
from __future__ import annotations

import pytest
import torch

from adadiff_export.model.config import ModelConfig, preset
from adadiff_export.model.uvit import UViT, patchify, unpatchify


def _inputs(model: UViT, b: int = 3):
    c = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, c.in_chans, c.img_size, c.img_size, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, c.num_classes + 1, (b,), generator=g)
    return x, t, y


def test_config_refuses_even_depth_and_bad_patch():
    with pytest.raises(ValueError, match="odd"):
        ModelConfig(depth=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge")


def test_paper_shapes_are_available():
    c = preset("uvit-s-cifar10")
    assert (c.img_size, c.patch_size, c.embed_dim, c.depth, c.num_heads) == (32, 2, 512, 13, 8)
    assert preset("small").depth == 13 and preset("small").img_size == 28


def test_patchify_round_trip():
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 2)
    assert p.shape == (2, 16, 12)
    assert torch.equal(unpatchify(p, 3), x)


def test_skip_wiring_pairs_in_and_out_blocks(model):
    # depth 5: in blocks 0,1; mid 2; out block j=1 (index 3) takes in block 2 (index 1), j=2 takes in block 1.
    assert [model.skip_source(i) for i in range(5)] == [None, None, None, 1, 0]


def test_piecewise_equals_forward_and_last_layer(model):
    x, t, y = _inputs(model)
    with torch.no_grad():
        full = model(x, t, y)
        h, temb = model.stem(x, t, y)
        saved = []
        for i in range(model.depth):
            src = model.skip_source(i)
            h = model.layer(i, h, saved[src] if src is not None else None)
            if i < model.config.num_in_blocks:
                saved.append(h)
        manual = model.head(h)
        outs = model.forward_all_layers(x, t, y)
    assert full.shape == x.shape
    torch.testing.assert_close(manual, full)
    torch.testing.assert_close(outs.eps_layers[-1], full)
    assert len(outs.eps_layers) == len(outs.u_maps) == model.depth
    for u in outs.u_maps:
        assert u.shape == x.shape and float(u.min()) > 0 and float(u.max()) < 1


def test_class_token_changes_the_prediction(model):
    x, t, _ = _inputs(model)
    with torch.no_grad():
        a = model(x, t, torch.zeros(3, dtype=torch.long))
        b = model(x, t, torch.full((3,), 10))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="needs y"):
        model(x, t, None)


def test_uem_input_is_detached(model):
    x, t, y = _inputs(model)
    outs = model.forward_all_layers(x, t, y)
    sum(u.sum() for u in outs.u_maps).backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for n, p in model.named_parameters()
               if not n.startswith("uems."))
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.uems.parameters())
