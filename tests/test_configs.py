"""Every config in configs/: loads, builds, has the expected non-local blocks, and differs from its
baseline only in the non-local backbone and keypoint head, so that the comparisons of Tables 5 and 6 are fair."""
import glob
import os

import pytest

from detectron2 import model_zoo
from detectron2.checkpoint.catalog import ModelCatalog
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from nl_detectron import add_nonlocal_config, nonlocal_blocks

CONFIG_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "configs"))
CONFIGS = sorted(
    os.path.relpath(p, CONFIG_DIR) for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
)
ZOO_DIR = os.path.dirname(model_zoo.get_config_file("Base-RCNN-FPN.yaml"))

NL_BACKBONE_OF = {
    "build_resnet_fpn_backbone": "build_resnet_fpn_nl_backbone",
    "build_resnet_backbone": "build_resnet_nl_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_retinanet_resnet_fpn_nl_backbone",
}
# The paper's placement, written out: right before the last residual block of res4.
TABLE5_BLOCKS = {
    "mask_rcnn_nl_R50.yaml": "backbone.bottom_up.res4.nonlocal5",
    "mask_rcnn_nl_R101.yaml": "backbone.bottom_up.res4.nonlocal22",
    "mask_rcnn_nl_X152.yaml": "backbone.bottom_up.res4.nonlocal35",
}
# Table 6 (Keypoint R-CNN R101-FPN): 4 blocks in the keypoint head, one after every 2 of its 8 convolutions
# (all 512-d), and for the last row Table 5's backbone block too.
HEAD_BLOCKS = {f"roi_heads.keypoint_head.nonlocal{k}": 512 for k in (2, 4, 6, 8)}
TABLE6_BLOCKS = {
    "keypoint_rcnn_R101.yaml": {},
    "keypoint_rcnn_nl_head_R101.yaml": HEAD_BLOCKS,
    "keypoint_rcnn_nl_R101.yaml": dict(HEAD_BLOCKS, **{"backbone.bottom_up.res4.nonlocal22": 1024}),
}
NL_KEYPOINT_HEAD = "KRCNNConvDeconvUpsampleNLHead"
# Residual blocks of res2..res5 (He et al., Table 1).
STAGE_BLOCKS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
# Keys that may differ between a non-local config and its baseline.
NONLOCAL_ONLY_KEYS = [
    ("MODEL", "BACKBONE", "NAME"), ("MODEL", "ROI_KEYPOINT_HEAD", "NAME"), ("MODEL", "NONLOCAL"), ("OUTPUT_DIR",)
]


def load(path, directory=CONFIG_DIR):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(directory, path))
    return cfg


def has_nonlocal_backbone(cfg):
    return cfg.MODEL.BACKBONE.NAME in NL_BACKBONE_OF.values()


def has_nonlocal_keypoint_head(cfg):
    return cfg.MODEL.KEYPOINT_ON and cfg.MODEL.ROI_KEYPOINT_HEAD.NAME == NL_KEYPOINT_HEAD


def is_nonlocal(cfg):
    return has_nonlocal_backbone(cfg) or has_nonlocal_keypoint_head(cfg)


def expected_blocks(cfg):
    """{module name: in_channels} of the blocks cfg.MODEL.NONLOCAL.LOCATIONS and .KEYPOINT_HEAD ask for."""
    blocks = {}
    if has_nonlocal_keypoint_head(cfg):
        conv_dims = cfg.MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS
        for k in cfg.MODEL.NONLOCAL.KEYPOINT_HEAD.AFTER_CONVS:
            blocks[f"roi_heads.keypoint_head.nonlocal{k}"] = conv_dims[k - 1]
    if not has_nonlocal_backbone(cfg):
        return blocks
    resnets = cfg.MODEL.RESNETS
    prefix = "backbone." if cfg.MODEL.BACKBONE.NAME == "build_resnet_nl_backbone" else "backbone.bottom_up."
    out_channels = {f"res{k}": resnets.RES2_OUT_CHANNELS * 2 ** (k - 2) for k in range(2, 6)}
    previous_out = {"res2": resnets.STEM_OUT_CHANNELS, "res3": out_channels["res2"],
                    "res4": out_channels["res3"], "res5": out_channels["res4"]}
    for stage, index in cfg.MODEL.NONLOCAL.LOCATIONS:
        index %= STAGE_BLOCKS[resnets.DEPTH][int(stage[3]) - 2]
        blocks[f"{prefix}{stage}.nonlocal{index}"] = out_channels[stage] if index else previous_out[stage]
    return blocks


def without(cfg, keys):
    d = cfg.clone()
    d.defrost()
    for key in keys:
        node = d
        for k in key[:-1]:
            node = node[k]
        del node[key[-1]]
    return d


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_with_the_expected_nonlocal_blocks(path):
    cfg = load(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    model = build_model(cfg)
    blocks = {name: block.in_channels for name, block in nonlocal_blocks(model).items()}
    if not is_nonlocal(cfg):
        assert blocks == {}
        return
    assert blocks == expected_blocks(cfg)
    if path in TABLE6_BLOCKS:
        assert blocks == TABLE6_BLOCKS[path]
        # Forward order: the backbone's block, then the head's after conv_fcn2, 4, 6, 8.
        assert list(nonlocal_blocks(model)) == sorted(TABLE6_BLOCKS[path], key=lambda n: (not n.startswith("backbone"), n))
        head = cfg.MODEL.NONLOCAL.KEYPOINT_HEAD
        assert (head.MODE, head.REDUCTION, head.SUBSAMPLE) == ("embedded_gaussian", 2, False)
        if "keypoint_head" in "".join(blocks):
            names = [n for n, _ in model.roi_heads.keypoint_head.named_children()]
            # Each block right after its convolution's ReLU, before the next convolution.
            for k in (2, 4, 6, 8):
                assert names[names.index(f"conv_fcn_relu{k}") + 1] == f"nonlocal{k}"
    if path in TABLE5_BLOCKS:
        assert blocks == {TABLE5_BLOCKS[path]: 1024}
        assert cfg.MODEL.NONLOCAL.MODE == "embedded_gaussian"
        # A 2x2 max-pool of x before phi and g (the authors' code), which keeps the paper's "<5%
        # computation"; the paper's text pools phi(x) and g(x) (the block's and the config's default).
        nl = cfg.MODEL.NONLOCAL
        assert (nl.REDUCTION, nl.SUBSAMPLE, nl.SUBSAMPLE_INPUT) == (2, True, True)


def baseline_pairs():
    """(non-local config, its baseline): the file with the same name without "nl_", where there is one."""
    pairs = []
    for path in CONFIGS:
        head, name = os.path.split(path)
        baseline = os.path.join(head, name.replace("_nl_head_", "_").replace("_nl_", "_"))
        if "_nl_" in name and baseline in CONFIGS:
            pairs.append((path, baseline))
    return pairs


def test_table5_and_table6_configs_have_their_baselines():
    assert set(TABLE5_BLOCKS) <= {nl for nl, _ in baseline_pairs()}
    assert set(TABLE6_BLOCKS) - {"keypoint_rcnn_R101.yaml"} <= {nl for nl, _ in baseline_pairs()}


def assert_nonlocal_only_in_backbone_and_head(nl, baseline):
    backbone, head = nl.MODEL.BACKBONE.NAME, nl.MODEL.ROI_KEYPOINT_HEAD.NAME
    assert backbone in (baseline.MODEL.BACKBONE.NAME, NL_BACKBONE_OF[baseline.MODEL.BACKBONE.NAME])
    assert head == baseline.MODEL.ROI_KEYPOINT_HEAD.NAME or (
        baseline.MODEL.ROI_KEYPOINT_HEAD.NAME == "KRCNNConvDeconvUpsampleHead" and head == NL_KEYPOINT_HEAD
    )
    assert without(nl, NONLOCAL_ONLY_KEYS) == without(baseline, NONLOCAL_ONLY_KEYS)


@pytest.mark.parametrize("nl_path, baseline_path", baseline_pairs())
def test_nonlocal_config_equals_its_baseline_but_for_the_backbone(nl_path, baseline_path):
    nl, baseline = load(nl_path), load(baseline_path)
    assert not is_nonlocal(baseline) and is_nonlocal(nl)
    assert nl.OUTPUT_DIR != baseline.OUTPUT_DIR  # runs do not overwrite each other
    assert_nonlocal_only_in_backbone_and_head(nl, baseline)


# Non-local configs without a baseline file here: their baseline is the model-zoo recipe they name.
NL_ZOO_BASELINES = {
    "cascade_mask_rcnn_nl_R50.yaml": "Misc/cascade_mask_rcnn_R_50_FPN_1x.yaml",
    "keypoint_rcnn_nl_R50.yaml": "COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml",
}


def test_every_coco_nonlocal_config_has_a_baseline():
    """Each non-local config that trains on COCO is compared with a baseline, here or in the model zoo."""
    with_baseline = {nl for nl, _ in baseline_pairs()} | set(NL_ZOO_BASELINES)
    for path in CONFIGS:
        cfg = load(path)
        if is_nonlocal(cfg) and any("coco" in d for d in cfg.DATASETS.TRAIN):
            assert path in with_baseline, path


@pytest.mark.parametrize("nl_path", sorted(NL_ZOO_BASELINES))
def test_nonlocal_config_equals_its_model_zoo_baseline_but_for_the_backbone(nl_path):
    nl, baseline = load(nl_path), load(NL_ZOO_BASELINES[nl_path], ZOO_DIR)
    assert is_nonlocal(nl)
    assert_nonlocal_only_in_backbone_and_head(nl, baseline)


# Table 5's baselines are detectron2's model-zoo recipes; X152 has none there, so it is the X101-32x8d
# recipe at depth 152 with the ImageNet-5k weights and their input normalisation.
ZOO_RECIPES = {
    "mask_rcnn_R50.yaml": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml", []),
    "mask_rcnn_R101.yaml": ("COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x.yaml", []),
    "keypoint_rcnn_R101.yaml": ("COCO-Keypoints/keypoint_rcnn_R_101_FPN_3x.yaml", []),
    "mask_rcnn_X152.yaml": (
        "COCO-InstanceSegmentation/mask_rcnn_X_101_32x8d_FPN_3x.yaml",
        [("MODEL", "RESNETS", "DEPTH"), ("MODEL", "WEIGHTS"), ("MODEL", "PIXEL_STD")],
    ),
}


@pytest.mark.parametrize("path", sorted(ZOO_RECIPES))
def test_baseline_configs_are_detectron2_model_zoo_recipes(path):
    zoo_path, differing = ZOO_RECIPES[path]
    ours, zoo = load(path), load(zoo_path, ZOO_DIR)
    keys = [("OUTPUT_DIR",)] + differing
    assert without(ours, keys) == without(zoo, keys)


def zoo_input_settings():
    """{weights: {(PIXEL_MEAN, PIXEL_STD, STRIDE_IN_1X1)}} over detectron2's model-zoo yaml configs."""
    settings = {}
    for path in glob.glob(os.path.join(ZOO_DIR, "**", "*.yaml"), recursive=True):
        cfg = load(path, ZOO_DIR)
        if "ImageNetPretrained/" in cfg.MODEL.WEIGHTS:
            m = cfg.MODEL
            settings.setdefault(m.WEIGHTS, set()).add(
                (tuple(m.PIXEL_MEAN), tuple(m.PIXEL_STD), m.RESNETS.STRIDE_IN_1X1)
            )
    return settings


def test_imagenet_weights_are_detectron2_names_with_their_input_normalisation():
    zoo = zoo_input_settings()
    checked = 0
    for path in CONFIGS:
        cfg = load(path)
        weights = cfg.MODEL.WEIGHTS
        if not weights:  # trained from scratch (configs/quick)
            continue
        # detectron2's own ImageNet models, or Detectron's through detectron2's model catalog.
        if weights.startswith("catalog://"):
            assert weights[len("catalog://"):].startswith("ImageNetPretrained/"), (path, weights)
            assert weights[len("catalog://ImageNetPretrained/"):] in ModelCatalog.C2_IMAGENET_MODELS, path
        else:
            assert weights.startswith("detectron2://ImageNetPretrained/"), (path, weights)
        # The weights' pixel normalisation and stride placement, as every model-zoo config using them has.
        assert weights in zoo, (path, weights)
        m = cfg.MODEL
        assert zoo[weights] == {(tuple(m.PIXEL_MEAN), tuple(m.PIXEL_STD), m.RESNETS.STRIDE_IN_1X1)}, path
        checked += 1
    assert checked >= 9  # the three Table 5 pairs, the three Table 6 configs
