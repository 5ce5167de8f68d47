"""The keypoint head with non-local blocks (issue 11, Table 6): detectron2 Keypoint R-CNN checkpoints load
into it with only the blocks' parameters missing and then give the baseline's keypoints; a block sits
exactly where the config puts it; bad placements fail at build time."""
import pytest
import torch
from torch.nn import functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import build_keypoint_head
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead

from nl_detectron import KRCNNConvDeconvUpsampleNLHead, NonLocalArgumentError, NonLocalBlock2d, nonlocal_blocks

from test_checkpoint_compat import RecordingCheckpointer, calibrate_frozen_bn, images, model_cfg, save_checkpoint

HEAD_PREFIX = "roi_heads.keypoint_head."
# The head's input: detectron2's keypoint pooler output on a 256-channel FPN.
HEAD_INPUT = ShapeSpec(channels=256, height=14, width=14)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, as test_checkpoint_compat: small inputs on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def keypoint_cfg(name):
    cfg = model_cfg(name)
    cfg.TEST.DETECTIONS_PER_IMAGE = 4  # each detection costs the 8-conv head ~3.7 GFLOPs
    return cfg


@pytest.fixture(scope="module")
def baseline():
    """detectron2's own Keypoint R-CNN R101-FPN (configs/keypoint_rcnn_R101.yaml), non-trivial weights."""
    torch.manual_seed(0)
    model = build_model(keypoint_cfg("keypoint_rcnn_R101.yaml"))
    assert type(model.roi_heads.keypoint_head) is KRCNNConvDeconvUpsampleHead and not nonlocal_blocks(model)
    calibrate_frozen_bn(model, images())
    return model.eval()


def block_keys(model):
    """The state_dict keys of every non-local block of ``model``."""
    names = tuple(n + "." for n in nonlocal_blocks(model))
    return sorted(k for k in model.state_dict() if k.startswith(names))


NL_CONFIGS = {
    # config: the blocks it has; all of them (and nothing else) are missing from a baseline checkpoint
    "keypoint_rcnn_nl_head_R101.yaml": [HEAD_PREFIX + f"nonlocal{k}" for k in (2, 4, 6, 8)],
    "keypoint_rcnn_nl_R101.yaml": ["backbone.bottom_up.res4.nonlocal22"] + [HEAD_PREFIX + f"nonlocal{k}" for k in (2, 4, 6, 8)],
}


def nonlocal_model(name):
    model = build_model(keypoint_cfg(name))
    assert list(nonlocal_blocks(model)) == NL_CONFIGS[name]
    return model.eval()


@pytest.mark.parametrize("file_format", ["pth", "pkl"])
@pytest.mark.parametrize("config", sorted(NL_CONFIGS))
def test_keypoint_rcnn_checkpoint_loads_with_only_nonlocal_params_missing(baseline, tmp_path, config, file_format):
    """A detectron2 Keypoint R-CNN checkpoint: a torch .pth, or a model-zoo .pkl of numpy arrays."""
    path = str(tmp_path / f"model_final.{file_format}")
    state = baseline.state_dict()
    save_checkpoint(state, path, file_format)

    model = nonlocal_model(config)
    expected_missing = block_keys(model)
    head_missing = [k for k in expected_missing if k.startswith(HEAD_PREFIX)]
    assert len(head_missing) == 4 * 8  # 4 blocks: theta, phi, g, w_z, weight and bias each
    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(path)
    assert checkpointer.incompatible.unexpected_keys == []
    assert sorted(checkpointer.incompatible.missing_keys) == expected_missing
    loaded = model.state_dict()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def keypoint_outputs(model, inputs):
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


@pytest.mark.parametrize("config", sorted(NL_CONFIGS))
def test_nonlocal_keypoint_rcnn_with_baseline_weights_gives_the_baseline_keypoints(baseline, config):
    inputs = images()
    model = nonlocal_model(config)
    model.load_state_dict(baseline.state_dict(), strict=False)
    expected = keypoint_outputs(baseline, inputs)
    got = keypoint_outputs(model, inputs)
    for exp, out in zip(expected, got):
        # Something to compare: a full set of detections, with keypoints that differ between them.
        assert len(exp) == 4
        assert exp.pred_keypoints[:, :, :2].unique().numel() > 4
        assert torch.equal(out.pred_boxes.tensor, exp.pred_boxes.tensor)
        assert torch.equal(out.scores, exp.scores)
        assert torch.equal(out.pred_keypoints, exp.pred_keypoints)
        assert torch.equal(out.pred_keypoint_heatmaps, exp.pred_keypoint_heatmaps)

    # The comparison can fail: once a head block is no longer the identity, the keypoints change.
    block = nonlocal_blocks(model)[HEAD_PREFIX + "nonlocal4"]
    with torch.no_grad():
        block.w_z.weight.normal_(std=0.05)
    changed = keypoint_outputs(model, inputs)
    assert not all(torch.equal(c.pred_keypoint_heatmaps, e.pred_keypoint_heatmaps) for c, e in zip(changed, expected))


def head_cfg(*opts):
    cfg = keypoint_cfg("keypoint_rcnn_nl_head_R101.yaml")
    cfg.merge_from_list(list(opts))
    return cfg


def reference_head(baseline_head, blocks, x):
    """The baseline head's own layers, run one by one, with ``blocks[k]`` applied right after conv k's ReLU."""
    k = 1
    while hasattr(baseline_head, f"conv_fcn{k}"):
        x = getattr(baseline_head, f"conv_fcn_relu{k}")(getattr(baseline_head, f"conv_fcn{k}")(x))
        if k in blocks:
            x = blocks[k](x)
        k += 1
    x = baseline_head.score_lowres(x)
    return F.interpolate(x, scale_factor=baseline_head.up_scale, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(
    "after_convs, randomised",
    [([2, 4, 6, 8], 6), ([3], 3), ([1, 8], 8), ([1, 8], 1)],
)
def test_randomised_head_block_runs_exactly_after_its_convolution(after_convs, randomised):
    torch.manual_seed(0)
    cfg = head_cfg("MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", after_convs)
    head = build_keypoint_head(cfg, HEAD_INPUT)
    assert isinstance(head, KRCNNConvDeconvUpsampleNLHead)
    cfg.MODEL.ROI_KEYPOINT_HEAD.NAME = "KRCNNConvDeconvUpsampleHead"
    baseline_head = build_keypoint_head(cfg, HEAD_INPUT)
    incompatible = head.load_state_dict(baseline_head.state_dict(), strict=False)
    assert incompatible.unexpected_keys == []
    assert {k.split(".")[0] for k in incompatible.missing_keys} == {f"nonlocal{k}" for k in after_convs}

    blocks = {k: getattr(head, f"nonlocal{k}") for k in after_convs}
    block = blocks[randomised]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.05)
    x = torch.rand(3, 256, 14, 14)
    with torch.no_grad():
        got = head.layers(x)
        expected = reference_head(baseline_head, {randomised: block}, x)
        assert torch.equal(got, expected)
        # The other blocks are identities; the randomised one moved by one convolution is not the head.
        moved = randomised + 1 if randomised < 8 else randomised - 1
        assert not torch.allclose(got, reference_head(baseline_head, {moved: block}, x), atol=1e-4)
        assert not torch.allclose(got, reference_head(baseline_head, {}, x), atol=1e-4)


def test_head_blocks_see_one_roi_each():
    """A block attends within its region only: changing one RoI's features leaves the others' outputs."""
    torch.manual_seed(0)
    head = build_keypoint_head(head_cfg(), HEAD_INPUT).eval()
    for block in nonlocal_blocks(head).values():
        with torch.no_grad():
            block.w_z.weight.normal_(std=0.05)
    x = torch.rand(3, 256, 14, 14)
    y = x.clone()
    y[1] = torch.rand(256, 14, 14)
    with torch.no_grad():
        a, b = head.layers(x), head.layers(y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and not torch.equal(a[1], b[1])


KEY = "cfg.MODEL.NONLOCAL.KEYPOINT_HEAD."
# (overrides, fragments the message must contain: the key, the bad value, the valid choices)
BAD_HEAD_SETTINGS = {
    "index past the last conv": (
        ["MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", [2, 9]], [KEY + "AFTER_CONVS", "[2, 9]", "9", "1..8"],
    ),
    "index zero": (["MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", [0, 2]], [KEY + "AFTER_CONVS", "[0, 2]", "1..8"]),
    "negative index": (["MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", [-1]], [KEY + "AFTER_CONVS", "[-1]", "1..8"]),
    "duplicate": (
        ["MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", [2, 4, 4]], [KEY + "AFTER_CONVS", "[2, 4, 4]", "duplicate", "conv_fcn4"],
    ),
    "a head with 4 convs": (
        ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", [512] * 4],
        [KEY + "AFTER_CONVS", "[2, 4, 6, 8]", "has 4", "1..4"],
    ),
    "a head without convs": (
        ["MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS", []],
        [KEY + "AFTER_CONVS", "[2, 4, 6, 8]", "no convolutions", "CONV_DIMS", "valid choices: []"],
    ),
    "unknown mode": (["MODEL.NONLOCAL.KEYPOINT_HEAD.MODE", "softmax"], [KEY + "MODE", "'softmax'", "'embedded_gaussian'"]),
    "reduction does not divide": (
        ["MODEL.NONLOCAL.KEYPOINT_HEAD.REDUCTION", 3], [KEY + "REDUCTION", "reduction=3", "in_channels=512"],
    ),
    "pooling x without subsampling": (
        ["MODEL.NONLOCAL.KEYPOINT_HEAD.SUBSAMPLE_INPUT", True], [KEY + "SUBSAMPLE_INPUT", "sub_sample=True"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEAD_SETTINGS))
def test_bad_head_setting_fails_building_the_head(case):
    opts, fragments = BAD_HEAD_SETTINGS[case]
    with pytest.raises(ValueError) as info:
        build_keypoint_head(head_cfg(*opts), HEAD_INPUT)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_head_placement_fails_building_the_model():
    """Through build_model, as tools/train_net.py builds it: before any training."""
    cfg = head_cfg("MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS", [8, 10], "MODEL.RESNETS.DEPTH", 18,
                   "MODEL.RESNETS.RES2_OUT_CHANNELS", 64)
    with pytest.raises(ValueError, match=r"cfg.MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS: after_convs=\[8, 10\]: 10 .*1..8"):
        build_model(cfg)


def test_head_constructor_checks_its_blocks():
    """Built without a config: the argument is named instead of the key."""
    with pytest.raises(NonLocalArgumentError) as info:
        KRCNNConvDeconvUpsampleNLHead(
            HEAD_INPUT, num_keypoints=5, conv_dims=[64, 64], loss_weight=1.0, loss_normalizer="visible",
            nonlocal_blocks={3: NonLocalBlock2d(64)},
        )
    assert info.value.argument == "nonlocal_blocks" and "1..2" in str(info.value)
