"""Bad settings and arguments fail before training, naming the key or argument, the bad value and the valid choices."""
import os
import subprocess

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import ResNet, build_backbone

from nl_detectron import NonLocalArgumentError, NonLocalBlock2d, add_nonlocal_blocks, add_nonlocal_config
from nl_detectron.data import check_datasets
from nl_detectron.engine import Trainer

from tiny_training import (
    REPO, SUBPROCESS_ENV, SUBPROCESS_TIMEOUT, TINY_CONFIG, train_net, train_net_args, train_net_command,
)


def tiny_model_cfg(*opts):
    """The tiny config's cfg (a ResNet-18-FPN with one non-local block before res4's last block), plus ``opts``."""
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(TINY_CONFIG)
    cfg.merge_from_list(list(opts))
    return cfg


def c4_cfg(*opts):
    """A C4 backbone: the ResNet stops at res4, res5 lives in the ROI head."""
    return tiny_model_cfg(
        "MODEL.BACKBONE.NAME", "build_resnet_nl_backbone", "MODEL.RESNETS.OUT_FEATURES", ["res4"], *opts
    )


def nl(key, value):
    return [f"MODEL.NONLOCAL.{key}", value]


# (cfg, the fragments the message must contain: the key, the bad value, the valid choices)
CFG_CASES = {
    "unknown mode": (
        tiny_model_cfg(*nl("MODE", "softmax")),
        ["cfg.MODEL.NONLOCAL.MODE", "'softmax'", "'embedded_gaussian'", "'concatenation'"],
    ),
    "unknown norm": (
        tiny_model_cfg(*nl("NORM", "BatchNorm")),
        ["cfg.MODEL.NONLOCAL.NORM", "'BatchNorm'", "'BN'", "'GN'"],
    ),
    "frozen norm": (
        tiny_model_cfg(*nl("NORM", "FrozenBN")),
        ["cfg.MODEL.NONLOCAL.NORM", "'FrozenBN'", "'BN'", "'GN'"],
    ),
    "stage res1": (
        tiny_model_cfg(*nl("LOCATIONS", [["res1", 0]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "'res1'", "res2, res3, res4, res5"],
    ),
    "stage res6": (
        tiny_model_cfg(*nl("LOCATIONS", [["res6", 0]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "'res6'", "res2, res3, res4, res5"],
    ),
    "res5 of a C4 backbone": (
        c4_cfg(*nl("LOCATIONS", [["res5", -1]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "'res5'", "ROI head", "valid choices: res2, res3, res4"],
    ),
    "block index past the end": (
        tiny_model_cfg(*nl("LOCATIONS", [["res4", 2]])),  # ResNet-18's res4 has blocks 0 and 1
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "['res4', 2]", "-2..1"],
    ),
    "block index before the start": (
        tiny_model_cfg(*nl("LOCATIONS", [["res3", -3]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "['res3', -3]", "-2..1"],
    ),
    "block index out of range for the depth": (
        tiny_model_cfg(*nl("LOCATIONS", [["res4", 5]])),  # right for ResNet-50, not for ResNet-18
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "['res4', 5]", "2 residual blocks", "-2..1"],
    ),
    "duplicate placement": (
        tiny_model_cfg(*nl("LOCATIONS", [["res4", 1], ["res4", -1]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "['res4', -1]", "duplicate"],
    ),
    "not a pair": (
        tiny_model_cfg(*nl("LOCATIONS", [["res4"]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "['res4']", "[stage, block_index]"],
    ),
    "stage not a name": (
        tiny_model_cfg(*nl("LOCATIONS", [[4, 1]])),
        ["cfg.MODEL.NONLOCAL.LOCATIONS", "[4, 1]", "[stage, block_index]"],
    ),
    "reduction does not divide the channels": (
        tiny_model_cfg(*nl("REDUCTION", 3)),  # res4's input has 256 channels
        ["cfg.MODEL.NONLOCAL.REDUCTION", "reduction=3", "in_channels=256", "1, 2, 4, 8, 16, 32, 64, 128, 256"],
    ),
    "reduction leaves zero inner channels": (
        tiny_model_cfg(*nl("REDUCTION", 512)),
        ["cfg.MODEL.NONLOCAL.REDUCTION", "reduction=512", "inner channels", "1, 2, 4"],
    ),
    "reduction zero": (
        tiny_model_cfg(*nl("REDUCTION", 0)),
        ["cfg.MODEL.NONLOCAL.REDUCTION", "reduction=0", "positive integer"],
    ),
    "pooling x without subsampling": (
        tiny_model_cfg(*nl("SUBSAMPLE", False), *nl("SUBSAMPLE_INPUT", True)),
        ["cfg.MODEL.NONLOCAL.SUBSAMPLE_INPUT", "sub_sample_input=True", "sub_sample=True"],
    ),
    "block in a stage FREEZE_AT freezes": (
        tiny_model_cfg("MODEL.BACKBONE.FREEZE_AT", 4),
        ["cfg.MODEL.BACKBONE.FREEZE_AT=4", "cfg.MODEL.NONLOCAL.LOCATIONS", "res4", "FREEZE_AT < 4"],
    ),
    "block in a stage FREEZE_AT freezes, C4": (
        c4_cfg("MODEL.BACKBONE.FREEZE_AT", 2, *nl("LOCATIONS", [["res2", 0]])),
        ["cfg.MODEL.BACKBONE.FREEZE_AT=2", "cfg.MODEL.NONLOCAL.LOCATIONS", "res2", "FREEZE_AT < 2"],
    ),
}


@pytest.mark.parametrize("case", list(CFG_CASES))
def test_bad_nonlocal_setting_fails_building_the_backbone(case):
    cfg, fragments = CFG_CASES[case]
    with pytest.raises(ValueError) as info:
        build_backbone(cfg)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_setting_stops_train_net_before_any_data_is_loaded(tmp_path, monkeypatch):
    """Through tools/train_net.py's main(): the error comes before the data loader or any iteration."""
    built = []
    monkeypatch.setattr(Trainer, "build_train_loader", classmethod(lambda cls, cfg: built.append(cfg)))
    module = train_net()
    args = module.default_argument_parser().parse_args(
        train_net_args(tmp_path, "MODEL.NONLOCAL.MODE", "softmax")
    )
    with pytest.raises(ValueError, match="cfg.MODEL.NONLOCAL.MODE: mode='softmax'"):
        module.main(args)
    assert built == []
    assert not any(name.endswith(".pth") for name in os.listdir(tmp_path))


# (kwargs of NonLocalBlock2d(in_channels=16, ...), the argument, the fragments of the message)
BLOCK_CASES = {
    "in_channels zero": (dict(in_channels=0), "in_channels", ["in_channels=0", "positive integer"]),
    "in_channels negative": (dict(in_channels=-16), "in_channels", ["in_channels=-16", "positive integer"]),
    "in_channels float": (dict(in_channels=16.0), "in_channels", ["in_channels=16.0", "positive integer"]),
    "in_channels bool": (dict(in_channels=True), "in_channels", ["in_channels=True", "positive integer"]),
    "unknown mode": (dict(mode="softmax"), "mode", ["mode='softmax'", "'embedded_gaussian'", "'dot_product'"]),
    "unknown norm": (dict(norm="BatchNorm"), "norm", ["norm='BatchNorm'", "'BN'", "'GN'"]),
    "frozen norm": (dict(norm="FrozenBN"), "norm", ["norm='FrozenBN'", "'BN'"]),
    "reduction does not divide": (dict(reduction=3), "reduction", ["reduction=3", "in_channels=16", "1, 2, 4, 8, 16"]),
    "zero inner channels": (dict(reduction=32), "reduction", ["reduction=32", "inner channels", "1, 2, 4, 8, 16"]),
    "reduction zero": (dict(reduction=0), "reduction", ["reduction=0", "positive integer"]),
    "reduction float": (dict(reduction=2.0), "reduction", ["reduction=2.0", "positive integer"]),
    "sub_sample not a bool": (dict(sub_sample="no"), "sub_sample", ["sub_sample='no'", "True, False"]),
    "use_scale not a bool": (dict(use_scale=None), "use_scale", ["use_scale=None", "True, False"]),
    "GN groups do not divide": (dict(norm="GN"), "norm", ["norm='GN'", "32 groups", "in_channels=16"]),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_bad_block_argument(case):
    kwargs, argument, fragments = BLOCK_CASES[case]
    kwargs = dict(dict(in_channels=16), **kwargs)
    with pytest.raises(NonLocalArgumentError) as info:
        NonLocalBlock2d(kwargs.pop("in_channels"), **kwargs)
    assert info.value.argument == argument
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "shape,fragments",
    [
        ((16, 8, 8), ["4-D", "(16, 8, 8)"]),
        ((1, 16, 4, 8, 8), ["4-D", "(1, 16, 4, 8, 8)"]),
        ((2, 8, 8, 8), ["in_channels=16", "8 channels", "(2, 8, 8, 8)"]),
    ],
)
def test_bad_block_input(shape, fragments):
    block = NonLocalBlock2d(16)
    for method in (block, block.pairwise_weights):
        with pytest.raises(ValueError) as info:
            method(torch.zeros(shape))
        for fragment in fragments:
            assert fragment in str(info.value), (fragment, str(info.value))


def test_add_nonlocal_blocks_refuses_a_frozen_stage():
    resnet = ResNet(_stem(), _stages(), out_features=["res3"])
    resnet.freeze(2)  # stem and res2
    with pytest.raises(NonLocalArgumentError) as info:
        add_nonlocal_blocks(resnet, [("res2", 0)])
    assert info.value.argument == "locations"
    assert "['res2', 0]" in str(info.value) and "frozen" in str(info.value)
    add_nonlocal_blocks(resnet, [("res3", 0)])  # an unfrozen stage is fine


def _stem():
    from detectron2.modeling.backbone.resnet import BasicStem

    return BasicStem(3, 16, norm="BN")


def _stages():
    from detectron2.modeling.backbone.resnet import BasicBlock

    return [
        ResNet.make_stage(BasicBlock, 2, in_channels=16, out_channels=16, norm="BN"),
        ResNet.make_stage(BasicBlock, 2, in_channels=16, out_channels=32, norm="BN", stride_per_block=[2, 1]),
    ]


def test_unregistered_dataset_fails_with_the_registered_ones():
    cfg = tiny_model_cfg("DATASETS.TRAIN", ("no_such_dataset",))
    with pytest.raises(KeyError) as info:
        check_datasets(cfg)
    message = str(info.value)
    assert "\\'" not in message  # printed as written, not as a repr
    for fragment in ["cfg.DATASETS.TRAIN", "'no_such_dataset'", "nl_shapes_train", "DETECTRON2_DATASETS"]:
        assert fragment in message, (fragment, message)


def test_missing_coco_fails_at_start_naming_the_path_and_detectron2_datasets(tmp_path):
    """detectron2 reads $DETECTRON2_DATASETS when it is imported: run tools/train_net.py as a user would."""
    empty = tmp_path / "datasets"
    empty.mkdir()
    env = dict(SUBPROCESS_ENV, DETECTRON2_DATASETS=str(empty))
    run = subprocess.run(
        train_net_command(tmp_path / "out", "DATASETS.TRAIN", "('coco_2017_train',)"),
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
    )
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert "FileNotFoundError" in output
    assert str(empty / "coco" / "annotations" / "instances_train2017.json") in output
    assert "DETECTRON2_DATASETS" in output and "cfg.DATASETS.TRAIN" in output
    # It stopped before building the model or loading any data.
    assert "Model:" not in output and "Starting training" not in output


@pytest.mark.parametrize("key,value", [("SUBSAMPLE", "no"), ("USE_SCALE", "1.5"), ("REDUCTION", "half")])
def test_wrongly_typed_setting_fails_merging(key, value):
    """yacs checks the types against the defaults of add_nonlocal_config."""
    with pytest.raises(ValueError) as info:
        tiny_model_cfg(*nl(key, value))
    assert f"MODEL.NONLOCAL.{key}" in str(info.value) and value in str(info.value)
