"""nl_detectron.flop_count: the non-local block's FLOPs, attention included, against analytic counts."""
import math

import pytest
import torch
from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from fvcore.nn import FlopCountAnalysis as FvcoreFlopCountAnalysis

from nl_detectron import NONLOCAL_MODES, NonLocalBlock2d, add_nonlocal_config
from nl_detectron.flop_count import flop_count_analysis, nonlocal_flop_handles


def analytic_flops(mode, batch, channels, height, width, sub_sample, reduction=2, sub_sample_input=False):
    """
    Multiply-adds of one block call (fvcore's convention: 1x1 convs and matrix products; no bias,
    elementwise, softmax or pooling), written out from the paper's equations as the block computes them.
    ``sub_sample_input``: phi and g run on the max-pooled x, at the key positions only.
    """
    inner = channels // reduction
    n = height * width
    n_keys = math.ceil(height / 2) * math.ceil(width / 2) if sub_sample else n
    key_convs = 1 if mode == "gaussian" else 2  # phi, g (gaussian: g only)
    query_convs = 0 if mode == "gaussian" else 1  # theta
    phi_g_positions = n_keys if sub_sample_input else n
    convs = batch * channels * inner * (query_convs * n + key_convs * phi_g_positions)
    convs += batch * n * inner * channels  # W_z
    if mode == "embedded_gaussian":
        pairwise = batch * n * n_keys * inner + batch * n * n_keys * inner  # theta phi^T, then @ g
    elif mode == "gaussian":
        pairwise = batch * n * n_keys * channels + batch * n * n_keys * inner  # x x^T, then @ g
    elif mode == "dot_product":
        pairwise = batch * inner * n_keys * inner + batch * n * inner * inner  # phi^T g, then theta @
    else:  # concatenation: w_theta^T theta_i, w_phi^T phi_j, then ReLU(. + .) @ g
        pairwise = batch * n * inner + batch * n_keys * inner + batch * n * n_keys * inner
    return convs + pairwise


@pytest.mark.parametrize("subsampling", ["none", "pool_phi_g", "pool_input"])
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_block_flops_equal_the_analytic_count(mode, subsampling):
    sub_sample, sub_sample_input = subsampling != "none", subsampling == "pool_input"
    block = NonLocalBlock2d(64, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input).eval()
    x = torch.randn(2, 64, 13, 10)  # odd height: the pooled key grid rounds up
    analysis = flop_count_analysis(block, x)
    assert analysis.total() == analytic_flops(mode, 2, 64, 13, 10, sub_sample, sub_sample_input=sub_sample_input)
    assert analysis.unsupported_ops() == {}
    pairwise_ops = set(analysis.by_operator()) - {"conv"}
    assert pairwise_ops == {
        "embedded_gaussian": {"scaled_dot_product_attention"},
        "gaussian": {"bmm"},
        "dot_product": {"matmul"},
        "concatenation": {"matmul"},
    }[mode]


@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_training_mode_counts_the_same(mode):
    # Concatenation recomputes its chunks in backward when gradients are on; the forward count is unchanged.
    block = NonLocalBlock2d(32, mode=mode).train()
    x = torch.randn(1, 32, 9, 8, requires_grad=True)
    assert flop_count_analysis(block, x).total() == analytic_flops(mode, 1, 32, 9, 8, True)


def test_plain_fvcore_misses_the_attention():
    """What the handle fixes: fvcore alone counts the convolutions and nothing of the attention."""
    block = NonLocalBlock2d(64).eval()
    x = torch.randn(1, 64, 12, 12)
    with torch.no_grad():  # as flop_count_analysis traces: inference ops, no autograd Functions
        plain = FvcoreFlopCountAnalysis(block, x).unsupported_ops_warnings(False)
        assert plain.total() == plain.by_operator()["conv"]
        assert "aten::scaled_dot_product_attention" in plain.unsupported_ops()
    counted = flop_count_analysis(block, x)
    assert counted.total() - plain.total() == counted.by_operator()["scaled_dot_product_attention"] > 0


class MaterialisedAttention(nn.Module):
    """softmax(q k^T * s) v written out as the matmuls that fvcore's own matmul handle counts."""

    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v


class FusedAttention(nn.Module):
    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)


@pytest.mark.parametrize(
    "q_shape, k_shape, v_shape",
    [((2, 1, 30, 16), (2, 1, 12, 16), (2, 1, 12, 8)), ((3, 4, 7, 5), (3, 4, 11, 5), (3, 4, 11, 5))],
)
def test_sdpa_handle_matches_fvcore_count_of_the_explicit_matmuls(q_shape, k_shape, v_shape):
    inputs = (torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape))
    fused = FvcoreFlopCountAnalysis(FusedAttention(), inputs).set_op_handle(**nonlocal_flop_handles())
    explicit = FvcoreFlopCountAnalysis(MaterialisedAttention(), inputs).unsupported_ops_warnings(False)
    assert fused.total() == explicit.by_operator()["matmul"] > 0


def test_backbone_counts_the_block_at_its_res4_input():
    """Through detectron2's analysis of a whole backbone, the block is attributed its own count."""
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_nl_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_backbone(cfg).eval()
    x = torch.randn(1, 3, 160, 96)  # res4 (stride 16): 10 x 6, 1024 channels
    analysis = flop_count_analysis(backbone, x)
    by_module = analysis.by_module()  # detectron2's tracing wrapper prefixes names with "model."
    block_flops = by_module["model.bottom_up.res4.nonlocal5"]
    assert block_flops == analytic_flops("embedded_gaussian", 1, 1024, 10, 6, True)
    # The rest is detectron2's baseline backbone, counted the same way: the block adds its own count to
    # res4 and to the total, and nothing else changes. (by_module is a Counter: a misspelt name would
    # read 0, hence the explicit membership checks.)
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    baseline = flop_count_analysis(build_backbone(cfg).eval(), x).by_module()
    for name in ("model.bottom_up.res4", "model.bottom_up.res5", "model.bottom_up.stem", ""):
        assert name in by_module and name in baseline, name
    assert by_module["model.bottom_up.res4"] == baseline["model.bottom_up.res4"] + block_flops
    assert by_module["model.bottom_up.res5"] == baseline["model.bottom_up.res5"] > 0
    assert analysis.total() == by_module[""] == baseline[""] + block_flops


@pytest.mark.parametrize("subsampling", ["none", "pool_phi_g", "pool_input"])
@pytest.mark.parametrize("mode", NONLOCAL_MODES)
def test_theta_phi_g_get_their_own_flops_and_every_module_runs(mode, subsampling):
    # theta, phi and g run as the convolutions they are: fvcore's per-module view gives each its count (it
    # read zero while they ran as one concatenated convolution), and no module goes uncalled but
    # concatenation's w_f, whose two halves the block applies to the rows directly.
    sub_sample, sub_sample_input = subsampling != "none", subsampling == "pool_input"
    block = NonLocalBlock2d(64, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input).eval()
    b, c, h, w, inner = 2, 64, 13, 10, 32
    n, n_keys = h * w, math.ceil(h / 2) * math.ceil(w / 2)
    analysis = flop_count_analysis(block, torch.randn(b, c, h, w))
    by_module = analysis.by_module()
    key_positions = n_keys if sub_sample_input else n
    expected = {"g": b * key_positions * c * inner, "w_z": b * n * inner * c}
    if mode != "gaussian":
        expected.update(theta=b * n * c * inner, phi=b * key_positions * c * inner)
    # detectron2's tracing wrapper prefixes names with "model.".
    assert {name: by_module["model." + name] for name in expected} == expected
    assert analysis.uncalled_modules() == ({"model.concat_project"} if mode == "concatenation" else set())
