"""The joint loss against a hand computation, and which parameters each term trains."""
from __future__ import annotations

import math

import pytest
import torch

from adadiff_export.model.schedule import VPSchedule
from adadiff_export.training.losses import AllLayers, LossConfig, diffusion_loss, joint_loss_terms


def test_terms_match_hand_computation():
    # Two layers, one sample, two pixels: every number is written out below.
    noise = torch.tensor([[[[0.5, -1.0]]]])
    eps1 = torch.tensor([[[[0.0, 0.0]]]])
    eps2 = torch.tensor([[[[0.5, -0.5]]]])
    u1 = torch.tensor([[[[0.25, 0.75]]]])
    u2 = torch.tensor([[[[0.1, 0.2]]]])
    terms = joint_loss_terms([eps1, eps2], [u1, u2], noise)

    simple = (0.0 ** 2 + 0.5 ** 2) / 2
    l_u = ((0.25 - math.tanh(0.5)) ** 2 + (0.75 - math.tanh(1.0)) ** 2) / 2 \
        + ((0.1 - math.tanh(0.0)) ** 2 + (0.2 - math.tanh(0.5)) ** 2) / 2
    ual = ((1 - 0.25) * 0.5 ** 2 + (1 - 0.75) * 1.0 ** 2) / 2  # last layer excluded
    assert float(terms["simple"]) == pytest.approx(simple, abs=1e-7)
    assert float(terms["u"]) == pytest.approx(l_u, abs=1e-7)
    assert float(terms["ual"]) == pytest.approx(ual, abs=1e-7)
    assert float(terms["layer"]) == pytest.approx((0.5 ** 2 + 1.0 ** 2) / 2, abs=1e-7)  # last layer excluded


def test_pseudo_label_is_detached_and_u_only_trains_uems(model):
    c = model.config
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, c.in_chans, c.img_size, c.img_size, generator=g) * 2 - 1
    y = torch.arange(4)
    terms = diffusion_loss(AllLayers(model), model, VPSchedule(), x0, y, LossConfig(), g)
    terms["u"].backward()
    backbone = [p for n, p in model.named_parameters() if not n.startswith("uems.")]
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in backbone)
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.uems.parameters())


def test_total_weights_terms_and_simple_loss(model):
    c = model.config
    x0 = torch.zeros(3, c.in_chans, c.img_size, c.img_size)
    y = torch.arange(3)
    cfg = LossConfig("joint", lambda_u=0.5, beta_ual=2.0)
    terms = diffusion_loss(AllLayers(model), model, VPSchedule(), x0, y, cfg, torch.Generator().manual_seed(3))
    expect = terms["simple"] + 0.5 * terms["u"] + 2.0 * terms["ual"]
    torch.testing.assert_close(terms["total"], expect)
    simple = diffusion_loss(model, model, VPSchedule(), x0, y, LossConfig("simple"), torch.Generator().manual_seed(3))
    # Same t and noise from the same seed: the plain loss is the joint loss's L_simple.
    torch.testing.assert_close(simple["total"], terms["simple"])
    assert "layer" not in terms  # the paper's loss: the optional term is neither added nor logged
    layered = diffusion_loss(AllLayers(model), model, VPSchedule(), x0, y, LossConfig("joint", 0.5, 2.0, 0.25),
                             torch.Generator().manual_seed(3))
    torch.testing.assert_close(layered["total"], expect + 0.25 * layered["layer"])
    with pytest.raises(ValueError):
        LossConfig("other")
    with pytest.raises(ValueError):
        LossConfig("joint", gamma_layer=-1.0)
