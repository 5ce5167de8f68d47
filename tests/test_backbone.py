"""The registered non-local backbones: placement, forward order, variants, identity at init, FREEZE_AT."""
import subprocess
import sys

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone

import nl_detectron
import reference_nonlocal as reference
from nl_detectron import NonLocalBlock2d, add_nonlocal_config, nonlocal_blocks

FPN = "build_resnet_fpn_nl_backbone"
C4 = "build_resnet_nl_backbone"
BASELINE_OF = {FPN: "build_resnet_fpn_backbone", C4: "build_resnet_backbone"}
# Where the bottom-up ResNet lives inside each backbone.
RESNET_PREFIX = {FPN: "bottom_up.", C4: ""}
# Residual blocks per stage (He et al., Table 1), written out here rather than taken from the code.
RES4_BLOCKS = {18: 2, 34: 6, 50: 6, 101: 23, 152: 36}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these inputs are tiny, and on a shared 2-core machine a second OpenMP thread
    spin-waiting for a busy core makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def backbone_cfg(builder=FPN, depth=50, norm="FrozenBN", groups=1, width_per_group=64, **nonlocal_keys):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.NAME = builder
    resnets = cfg.MODEL.RESNETS
    resnets.DEPTH, resnets.NORM = depth, norm
    resnets.NUM_GROUPS, resnets.WIDTH_PER_GROUP = groups, width_per_group
    if depth < 50:
        resnets.RES2_OUT_CHANNELS = 64
    if builder == FPN:
        resnets.OUT_FEATURES = cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    else:
        resnets.OUT_FEATURES = ["res4"]  # a C4 model: res5 belongs to the ROI head
    for key, value in nonlocal_keys.items():
        setattr(cfg.MODEL.NONLOCAL, key, value)
    return cfg


def baseline_of(cfg):
    """The same backbone without non-local blocks: detectron2's own builder."""
    cfg = cfg.clone()
    cfg.MODEL.BACKBONE.NAME = BASELINE_OF[cfg.MODEL.BACKBONE.NAME]
    return cfg


def resnet_of(backbone):
    return getattr(backbone, "bottom_up", backbone)


def record_call_order(stage):
    """Forward hooks on the children of ``stage``; returns the list they append their names to."""
    calls = []
    for name, child in stage.named_children():
        child.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    return calls


def test_importing_nl_detectron_registers_both_backbones():
    # A fresh interpreter: in this one nl_detectron is already imported.
    code = (
        "from detectron2.modeling import BACKBONE_REGISTRY as R\n"
        "names = ('build_resnet_nl_backbone', 'build_resnet_fpn_nl_backbone')\n"
        "assert not any(n in R for n in names), 'registered before import'\n"
        "import nl_detectron\n"
        "assert R.get(names[0]) is nl_detectron.build_resnet_nl_backbone\n"
        "assert R.get(names[1]) is nl_detectron.build_resnet_fpn_nl_backbone\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert BACKBONE_REGISTRY.get(C4) is nl_detectron.build_resnet_nl_backbone
    assert BACKBONE_REGISTRY.get(FPN) is nl_detectron.build_resnet_fpn_nl_backbone


@pytest.mark.parametrize("builder", [FPN, C4])
@pytest.mark.parametrize("depth, before_block", [(50, 5), (101, 22)])
def test_default_placement_is_right_before_the_last_res4_block(builder, depth, before_block):
    backbone = build_backbone(backbone_cfg(builder, depth))
    res4 = resnet_of(backbone).res4
    prefix = RESNET_PREFIX[builder]

    blocks = nonlocal_blocks(backbone)
    assert list(blocks) == [f"{prefix}res4.nonlocal{before_block}"]
    assert blocks[f"{prefix}res4.nonlocal{before_block}"].in_channels == 1024
    expected_order = [str(i) for i in range(before_block)] + [f"nonlocal{before_block}", str(before_block)]
    assert [name for name, _ in res4.named_children()] == expected_order
    assert before_block == RES4_BLOCKS[depth] - 1

    # It runs in that order, on the output of the block before it, and feeds the last block.
    calls = record_call_order(res4)
    seen = {}
    res4.get_submodule(str(before_block - 1)).register_forward_hook(lambda m, i, o: seen.update(prev_out=o))
    res4.get_submodule(f"nonlocal{before_block}").register_forward_hook(
        lambda m, i, o: seen.update(nl_in=i[0], nl_out=o)
    )
    res4.get_submodule(str(before_block)).register_forward_hook(lambda m, i, o: seen.update(last_in=i[0]))
    backbone(torch.randn(1, 3, 64, 64))
    assert calls == expected_order
    assert seen["nl_in"] is seen["prev_out"]
    assert seen["last_in"] is seen["nl_out"]


VARIANTS = [
    pytest.param(dict(depth=18), id="R18"),
    pytest.param(dict(depth=34), id="R34"),
    pytest.param(dict(depth=50), id="R50"),
    pytest.param(dict(depth=101), id="R101"),
    pytest.param(dict(depth=152), id="R152"),
    pytest.param(dict(depth=101, groups=32, width_per_group=8), id="X101-32x8d"),
    pytest.param(dict(depth=50, norm="BN"), id="R50-BN"),
    pytest.param(dict(depth=50, norm="GN"), id="R50-GN"),
    pytest.param(dict(depth=50, norm="SyncBN"), id="R50-SyncBN"),
    pytest.param(dict(depth=50, NORM="BN"), id="R50-block-BN"),
    pytest.param(dict(depth=50, NORM="GN"), id="R50-block-GN"),
]


EMBEDDING_KEYS = ["theta.weight", "theta.bias", "phi.weight", "phi.bias", "g.weight", "g.bias"]
# The block's parameters and buffers for each MODEL.NONLOCAL.NORM: W_z has a bias only without a norm.
BLOCK_KEYS = {
    "": EMBEDDING_KEYS + ["w_z.weight", "w_z.bias"],
    "BN": EMBEDDING_KEYS + ["w_z.weight"] + [f"w_z.norm.{k}" for k in ("weight", "bias", "running_mean", "running_var")],
    "GN": EMBEDDING_KEYS + ["w_z.weight", "w_z.norm.weight", "w_z.norm.bias"],
}
BLOCK_NORM_TYPE = {"": type(None), "BN": torch.nn.BatchNorm2d, "GN": torch.nn.GroupNorm}


@pytest.mark.parametrize("builder", [FPN, C4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_build_run_and_equal_the_baseline_at_init(builder, variant):
    cfg = backbone_cfg(builder, **variant)
    torch.manual_seed(0)
    baseline = build_backbone(baseline_of(cfg))
    backbone = build_backbone(cfg)

    # One block, before the last residual block of res4, with that block's input channels.
    depth = cfg.MODEL.RESNETS.DEPTH
    last = RES4_BLOCKS[depth] - 1
    (name, block), = nonlocal_blocks(backbone).items()
    assert name == f"{RESNET_PREFIX[builder]}res4.nonlocal{last}"
    assert block.in_channels == (256 if depth < 50 else 1024)

    # The baseline's weights load under their own names; only the block's own are missing: its
    # embeddings and W_z, with the norm after W_z that MODEL.NONLOCAL.NORM names, written out here.
    incompatible = backbone.load_state_dict(baseline.state_dict(), strict=False)
    assert incompatible.unexpected_keys == []
    # (BatchNorm fills in a missing num_batches_tracked itself instead of reporting it.)
    assert sorted(incompatible.missing_keys) == sorted(
        f"{name}.{k}" for k in BLOCK_KEYS[cfg.MODEL.NONLOCAL.NORM]
    )
    assert type(block.w_z.norm) is BLOCK_NORM_TYPE[cfg.MODEL.NONLOCAL.NORM]

    x = torch.randn(2, 3, 64, 64)
    expected, out = baseline(x), backbone(x)
    assert list(out) == list(expected) == list(backbone.output_shape())
    for feature, spec in backbone.output_shape().items():
        assert out[feature].shape == (2, spec.channels, 64 // spec.stride, 64 // spec.stride)
        assert torch.equal(out[feature], expected[feature]), feature

    # The comparison can fail: a block that is not the identity changes the output.
    with torch.no_grad():
        for p in block.w_z.parameters():
            p.normal_(std=0.1)
    out = backbone(x)
    assert not all(torch.equal(out[f], expected[f]) for f in out)


@pytest.mark.parametrize("builder", [FPN, C4])
def test_identity_at_init_with_frozen_bn_in_eval_mode(builder):
    # The fine-tuning setup of Table 5: ImageNet-style frozen BN, eval mode, both batch images.
    cfg = backbone_cfg(builder, depth=50)
    baseline, backbone = build_backbone(baseline_of(cfg)).eval(), build_backbone(cfg).eval()
    backbone.load_state_dict(baseline.state_dict(), strict=False)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected, out = baseline(x), backbone(x)
    for feature in expected:
        assert torch.equal(out[feature], expected[feature]), feature


def test_multiple_locations_and_negative_indices():
    locations = [["res3", -1], ["res4", 0], ["res4", -1]]
    cfg = backbone_cfg(FPN, 50, LOCATIONS=locations)
    backbone = build_backbone(cfg)
    resnet = backbone.bottom_up
    assert list(nonlocal_blocks(backbone)) == [
        "bottom_up.res3.nonlocal3", "bottom_up.res4.nonlocal0", "bottom_up.res4.nonlocal5"
    ]
    assert [b.in_channels for b in nonlocal_blocks(backbone).values()] == [512, 512, 1024]
    res3_order = ["0", "1", "2", "nonlocal3", "3"]
    res4_order = ["nonlocal0", "0", "1", "2", "3", "4", "nonlocal5", "5"]
    assert [n for n, _ in resnet.res3.named_children()] == res3_order
    assert [n for n, _ in resnet.res4.named_children()] == res4_order
    calls3, calls4 = record_call_order(resnet.res3), record_call_order(resnet.res4)

    baseline = build_backbone(baseline_of(cfg))
    backbone.load_state_dict(baseline.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 96)
    expected, out = baseline(x), backbone(x)
    assert calls3 == res3_order and calls4 == res4_order
    for feature in expected:
        assert torch.equal(out[feature], expected[feature]), feature

    # Negative indices count from the end of the stage: -6..-1 is 0..5 in R50's res4.
    same = build_backbone(backbone_cfg(FPN, 50, LOCATIONS=[["res3", -1], ["res4", -6], ["res4", -1]]))
    assert list(nonlocal_blocks(same)) == list(nonlocal_blocks(backbone))
    second_to_last = build_backbone(backbone_cfg(C4, 50, LOCATIONS=[["res4", -2]]))
    assert list(nonlocal_blocks(second_to_last)) == ["res4.nonlocal4"]


def test_adding_blocks_to_a_stage_that_has_one_keeps_both():
    backbone = build_backbone(backbone_cfg(C4, 50))  # res4.nonlocal5 from the config
    nl_detectron.add_nonlocal_blocks(backbone, [("res4", 0)])
    order = ["nonlocal0", "0", "1", "2", "3", "4", "nonlocal5", "5"]
    assert [n for n, _ in backbone.res4.named_children()] == order
    calls = record_call_order(backbone.res4)
    backbone(torch.randn(1, 3, 64, 64))
    assert calls == order
    with pytest.raises(ValueError, match=r"locations=\['res4', -1\].*already has a non-local block"):
        nl_detectron.add_nonlocal_blocks(backbone, [("res4", -1)])


@pytest.mark.parametrize(
    "locations, message",
    [
        ([["res4", -7]], r"MODEL\.NONLOCAL\.LOCATIONS.*-6\.\.5"),
        ([["res4", 6]], r"MODEL\.NONLOCAL\.LOCATIONS.*-6\.\.5"),
        ([["res6", 0]], r"MODEL\.NONLOCAL\.LOCATIONS.*res6.*res2, res3, res4, res5"),
        ([["res4", -1], ["res4", 5]], r"MODEL\.NONLOCAL\.LOCATIONS.*duplicate"),
    ],
)
def test_bad_locations_are_refused_naming_the_key(locations, message):
    with pytest.raises(ValueError, match=message):
        build_backbone(backbone_cfg(FPN, 50, LOCATIONS=locations))


def test_res5_location_in_a_c4_backbone_is_refused():
    with pytest.raises(ValueError, match=r"MODEL\.NONLOCAL\.LOCATIONS.*res5.*ROI head"):
        build_backbone(backbone_cfg(C4, 50, LOCATIONS=[["res5", -1]]))


@pytest.mark.parametrize("builder", [FPN, C4])
@pytest.mark.parametrize(
    "freeze_at, locations, stage",
    [(4, [["res4", -1]], "res4"), (5, [["res4", -1]], "res4"), (3, [["res3", 0]], "res3")],
)
def test_freeze_at_freezing_a_nonlocal_stage_is_refused(builder, freeze_at, locations, stage):
    cfg = backbone_cfg(builder, 50, LOCATIONS=locations)
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    with pytest.raises(ValueError, match=rf"MODEL\.BACKBONE\.FREEZE_AT={freeze_at}.*{stage}") as e:
        build_backbone(cfg)
    assert "MODEL.NONLOCAL.LOCATIONS" in str(e.value)


@pytest.mark.parametrize("freeze_at", [0, 2, 3])
def test_freeze_at_below_the_nonlocal_stage_works(freeze_at):
    cfg = backbone_cfg(FPN, 50)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2  # detectron2's default
    cfg.MODEL.BACKBONE.FREEZE_AT = freeze_at
    resnet = build_backbone(cfg).bottom_up
    (block,) = [m for m in resnet.modules() if isinstance(m, NonLocalBlock2d)]
    assert all(p.requires_grad for p in block.parameters())
    assert all(p.requires_grad for p in resnet.res4.parameters())
    frozen = ["stem", "res2", "res3"][:freeze_at]
    for stage in ["stem", "res2", "res3", "res4", "res5"]:
        params = list(getattr(resnet, stage).parameters())
        assert all(p.requires_grad != (stage in frozen) for p in params), stage


# MODEL.NONLOCAL settings, each one reaching the block through the config: the built block computes what
# the paper's equations (tests/reference_nonlocal.py) compute with those settings, written out here.
CONFIG_TO_BLOCK = [
    pytest.param(dict(USE_SCALE=False), id="unscaled"),
    pytest.param(dict(REDUCTION=4), id="reduction4"),
    pytest.param(dict(REDUCTION=1, MODE="dot_product"), id="reduction1-dot_product"),
    pytest.param(dict(NORM="GN", USE_SCALE=False, REDUCTION=8), id="GN-unscaled-reduction8"),
    pytest.param(dict(NORM="BN", SUBSAMPLE=False), id="BN-no-subsampling"),
    pytest.param(dict(MODE="gaussian", USE_SCALE=False, SUBSAMPLE_INPUT=True), id="gaussian-unscaled-x-pooled"),
    pytest.param(dict(MODE="concatenation", SUBSAMPLE_INPUT=True), id="concatenation-x-pooled"),
]
NONLOCAL_DEFAULTS = dict(MODE="embedded_gaussian", REDUCTION=2, SUBSAMPLE=True, SUBSAMPLE_INPUT=False, USE_SCALE=True, NORM="")


@pytest.mark.parametrize("builder", [FPN, C4])
@pytest.mark.parametrize("settings", CONFIG_TO_BLOCK)
def test_nonlocal_config_keys_reach_the_block(builder, settings):
    keys = dict(NONLOCAL_DEFAULTS, **settings)
    backbone = build_backbone(backbone_cfg(builder, depth=18, **settings)).eval()
    (block,) = nonlocal_blocks(backbone).values()
    assert block.in_channels == 256  # R18's res4
    assert block.inner_channels == 256 // keys["REDUCTION"]
    assert type(block.w_z.norm) is BLOCK_NORM_TYPE[keys["NORM"]]
    # Weights and norm statistics far from their identity-mapping start, so that every setting shows.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in block.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif t.is_floating_point():
                t.normal_(std=0.3)

    x = torch.randn(2, 256, 7, 6, dtype=torch.float64)
    norm = None
    if keys["NORM"] == "BN":
        n = block.w_z.norm
        norm = reference.batch_norm_eval(n.weight.double(), n.bias.double(), n.running_mean.double(), n.running_var.double(), 1e-5)
    elif keys["NORM"] == "GN":
        norm = reference.group_norm(32, block.w_z.norm.weight.double(), block.w_z.norm.bias.double(), 1e-5)
    expected = reference.reference_nonlocal(
        x, reference.block_weights(block, torch.float64), mode=keys["MODE"], sub_sample=keys["SUBSAMPLE"],
        sub_sample_input=keys["SUBSAMPLE_INPUT"], use_scale=keys["USE_SCALE"], norm=norm,
    )
    with torch.no_grad():
        out = block.double()(x)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-9, atol=1e-9)


def test_dc5_c4_backbone_has_the_block_and_dilated_res5():
    """DC5 (RES5_DILATION 2): res5 stays at stride 16 with dilated 3x3 convs; blocks in res4 and in res5."""
    cfg = backbone_cfg(C4, 50, LOCATIONS=[["res4", -1], ["res5", -1]])
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res5"]  # detectron2's Base-RCNN-DilatedC5.yaml
    baseline, backbone = build_backbone(baseline_of(cfg)), build_backbone(cfg)
    assert {n: b.in_channels for n, b in nonlocal_blocks(backbone).items()} == {
        "res4.nonlocal5": 1024, "res5.nonlocal2": 2048
    }
    assert backbone.output_shape()["res5"].stride == 16
    assert [n for n, _ in backbone.res5.named_children()] == ["0", "1", "nonlocal2", "2"]
    assert all(backbone.res5.get_submodule(f"{i}.conv2").dilation == (2, 2) for i in range(3))
    assert backbone.load_state_dict(baseline.state_dict(), strict=False).unexpected_keys == []
    x = torch.randn(1, 3, 64, 96)
    out, expected = backbone(x)["res5"], baseline(x)["res5"]
    assert out.shape == (1, 2048, 4, 6)  # stride 16
    assert torch.equal(out, expected)  # identity at initialisation


def test_dc5_fpn_backbone_is_refused_as_detectron2_refuses_it():
    """detectron2's FPN needs strides that double from level to level, which a dilated res5 breaks."""
    cfg = backbone_cfg(FPN, 50)
    cfg.MODEL.RESNETS.RES5_DILATION = 2
    with pytest.raises(AssertionError) as baseline_error:
        build_backbone(baseline_of(cfg))
    with pytest.raises(AssertionError) as error:
        build_backbone(cfg)
    assert str(error.value) == str(baseline_error.value) == "Strides 16 16 are not log2 contiguous"
