"""Baseline checkpoints load into the non-local Mask R-CNN, and give the baseline's detections at init.

Issue: "Every parameter and buffer of the baseline model keeps its baseline name in the non-local model,
so a detectron2 baseline checkpoint (a model-zoo Mask R-CNN .pth/.pkl, or ImageNet R-50.pkl through
detectron2's Caffe2 name mapping) loads with only the non-local block's own parameters reported missing."
"""
import logging
import os
import pickle
import re

import numpy as np
import pytest
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from nl_detectron import add_nonlocal_config, nonlocal_blocks

CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
NL_PARAMS_PREFIX = "backbone.bottom_up.res4.nonlocal5."


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these inputs are tiny, and on a shared 2-core machine a second OpenMP thread
    spin-waiting for a busy core makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(name):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIGS, name))
    cfg.MODEL.DEVICE = "cpu"
    # Fewer proposals and detections keep CPU inference to a fraction of a second; a zero score
    # threshold makes sure there are detections to compare even with untrained heads.
    cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 8
    return cfg


def images():
    """Two small BGR images with a few filled rectangles, in detectron2's input format."""
    rng = np.random.default_rng(0)
    out = []
    for h, w in [(160, 224), (192, 160)]:
        img = rng.uniform(0, 60, size=(h, w, 3))
        for _ in range(4):
            y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
            y1, x1 = y0 + rng.integers(20, 40), x0 + rng.integers(20, 40)
            img[y0:y1, x0:x1] = rng.uniform(80, 255, size=3)
        tensor = torch.as_tensor(img.transpose(2, 0, 1), dtype=torch.float32)
        out.append({"image": tensor, "height": h, "width": w})
    return out


def calibrate_frozen_bn(model, inputs):
    """
    Give every FrozenBatchNorm2d statistics of real activations and a random affine part, as a trained
    checkpoint has, instead of the identity init under which activations grow with depth and every
    detection saturates. Each norm normalises its own input during one forward pass.
    """
    gen = torch.Generator().manual_seed(1)

    def set_statistics(norm, args):
        x = args[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)
        norm.weight.copy_(torch.rand(norm.num_features, generator=gen) + 0.5)
        norm.bias.copy_(torch.randn(norm.num_features, generator=gen) * 0.2)

    handles = [m.register_forward_pre_hook(set_statistics) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert handles
    with torch.no_grad():
        model.eval()
        model(inputs)
    for h in handles:
        h.remove()


@pytest.fixture(scope="module")
def baseline():
    """detectron2's own Mask R-CNN R50-FPN (configs/mask_rcnn_R50.yaml) with non-trivial weights."""
    torch.manual_seed(0)
    model = build_model(model_cfg("mask_rcnn_R50.yaml"))
    assert not nonlocal_blocks(model)
    calibrate_frozen_bn(model, images())
    return model.eval()


def nonlocal_model():
    model = build_model(model_cfg("mask_rcnn_nl_R50.yaml"))
    assert list(nonlocal_blocks(model)) == ["backbone.bottom_up.res4.nonlocal5"]
    return model.eval()


def nonlocal_keys(model):
    return sorted(k for k in model.state_dict() if k.startswith(NL_PARAMS_PREFIX))


class RecordingCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that keeps the missing/unexpected keys it reports, and its log messages."""

    def _log_incompatible_keys(self, incompatible):
        self.incompatible = incompatible
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        self.logger.addHandler(handler)
        try:
            super()._log_incompatible_keys(incompatible)
        finally:
            self.logger.removeHandler(handler)
        self.messages = [re.sub(r"\x1b\[[0-9;]*m", "", r.getMessage()) for r in records]


def test_baseline_state_dict_loads_with_only_nonlocal_params_missing(baseline):
    model = nonlocal_model()
    expected_missing = nonlocal_keys(model)
    assert len(expected_missing) == 8  # theta, phi, g, w_z: weight and bias each
    incompatible = model.load_state_dict(baseline.state_dict(), strict=False)
    assert incompatible.unexpected_keys == []
    assert sorted(incompatible.missing_keys) == expected_missing
    loaded = model.state_dict()
    for name, value in baseline.state_dict().items():
        assert torch.equal(loaded[name], value), name


def save_checkpoint(state, path, file_format):
    """``state`` as detectron2 checkpoints are: a torch .pth, or a model-zoo .pkl of numpy arrays."""
    if file_format == "pth":
        torch.save({"model": state, "iteration": 90000}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "test"}, f)


@pytest.mark.parametrize("file_format", ["pth", "pkl"])
def test_model_zoo_checkpoint_loads_through_detection_checkpointer(baseline, tmp_path, file_format):
    """A detectron2 Mask R-CNN checkpoint: a torch .pth, or a model zoo .pkl of numpy arrays."""
    path = str(tmp_path / f"model_final.{file_format}")
    state = baseline.state_dict()
    save_checkpoint(state, path, file_format)

    model = nonlocal_model()
    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(path)
    assert checkpointer.incompatible.unexpected_keys == []
    assert sorted(checkpointer.incompatible.missing_keys) == nonlocal_keys(model)
    # What the user reads: one warning, listing the non-local block's parameters and nothing else.
    (message,) = checkpointer.messages
    header, *groups = message.splitlines()
    assert header == "Some model parameters or buffers are not found in the checkpoint:"
    assert groups and all(g.startswith(NL_PARAMS_PREFIX) for g in groups), groups
    loaded = model.state_dict()
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def caffe2_name(name):
    """detectron2 ResNet name -> Caffe2 (Detectron / MSRA ImageNet .pkl) name; the inverse of the
    renaming in detectron2/checkpoint/c2_model_loading.py, written out for R-50."""
    norm_suffix = {"weight": "s", "bias": "b", "running_mean": "rm", "running_var": "riv"}
    m = re.fullmatch(r"stem\.conv1\.(weight|norm\.(\w+))", name)
    if m:
        return "conv1_w" if m.group(2) is None else f"res_conv1_bn_{norm_suffix[m.group(2)]}"
    m = re.fullmatch(r"(res\d)\.(\d+)\.(conv[123]|shortcut)\.(weight|norm\.(\w+))", name)
    assert m, name
    stage, block, conv, _, norm_param = m.groups()
    branch = {"conv1": "branch2a", "conv2": "branch2b", "conv3": "branch2c", "shortcut": "branch1"}[conv]
    prefix = f"{stage}_{block}_{branch}"
    return f"{prefix}_w" if norm_param is None else f"{prefix}_bn_{norm_suffix[norm_param]}"


def write_caffe2_imagenet_pkl(resnet_state, path):
    """An ImageNet classification checkpoint as the Caffe2 model zoo ships them: a pickled dict of
    Caffe2 blob names to numpy arrays, with the 1000-class classifier and solver momentum blobs."""
    gen = torch.Generator().manual_seed(2)
    blobs = {caffe2_name(k): v.numpy() for k, v in resnet_state.items()}
    assert len(blobs) == len(resnet_state)
    blobs["fc1000_w"] = torch.randn(1000, 2048, generator=gen).numpy()
    blobs["fc1000_b"] = torch.randn(1000, generator=gen).numpy()
    blobs["conv1_w_momentum"] = np.zeros_like(blobs["conv1_w"])
    with open(path, "wb") as f:
        pickle.dump(blobs, f)


def test_caffe2_imagenet_pkl_loads_the_whole_resnet_with_only_nonlocal_params_missing(tmp_path):
    # An ImageNet R-50: detectron2's own ResNet-50 (as the baseline Mask R-CNN builds it) with random
    # weights and random frozen-BN statistics, saved under Caffe2 names.
    torch.manual_seed(3)
    baseline = build_model(model_cfg("mask_rcnn_R50.yaml"))
    resnet_state = {
        k: torch.randn(v.shape) if v.is_floating_point() else v
        for k, v in baseline.backbone.bottom_up.state_dict().items()
    }
    path = str(tmp_path / "R-50.pkl")
    write_caffe2_imagenet_pkl(resnet_state, path)

    def load_into(model):
        checkpointer = RecordingCheckpointer(model)
        checkpointer.load(path)  # ".pkl" without "__author__": detectron2's Caffe2 name matching
        return checkpointer.incompatible

    model = nonlocal_model()
    incompatible = load_into(model)
    baseline_incompatible = load_into(baseline)

    # Every ResNet weight and statistic arrived, under its baseline name.
    loaded = model.state_dict()
    for name, value in resnet_state.items():
        assert torch.equal(loaded["backbone.bottom_up." + name], value), name
    # Missing: what the baseline also misses (FPN and heads are not in an ImageNet model), plus the
    # non-local block's own parameters, and nothing else of the ResNet.
    missing = sorted(incompatible.missing_keys)
    assert missing == sorted(baseline_incompatible.missing_keys + nonlocal_keys(model))
    assert [k for k in missing if k.startswith("backbone.bottom_up.")] == nonlocal_keys(model)
    # Unexpected: only the ImageNet classifier, as for the baseline.
    assert sorted(incompatible.unexpected_keys) == sorted(baseline_incompatible.unexpected_keys)
    assert sorted(incompatible.unexpected_keys) == ["fc1000.bias", "fc1000.weight"]


def detections(model, inputs):
    with torch.no_grad():
        return [out["instances"] for out in model(inputs)]


def test_nonlocal_model_with_baseline_weights_gives_the_baseline_detections(baseline):
    inputs = images()
    model = nonlocal_model()
    model.load_state_dict(baseline.state_dict(), strict=False)
    expected = detections(baseline, inputs)
    got = detections(model, inputs)
    for exp, out in zip(expected, got):
        # There is something to compare: a full set of distinct detections with non-trivial masks.
        assert len(exp) == 8
        assert exp.scores.unique().numel() == 8
        assert 0 < exp.pred_masks.float().mean() < 1
        assert torch.equal(out.pred_boxes.tensor, exp.pred_boxes.tensor)
        assert torch.equal(out.scores, exp.scores)
        assert torch.equal(out.pred_classes, exp.pred_classes)
        assert torch.equal(out.pred_masks, exp.pred_masks)

    # The comparison can fail: once the block is no longer the identity, the detections change.
    (block,) = nonlocal_blocks(model).values()
    with torch.no_grad():
        block.w_z.weight.normal_(std=0.05)
    changed = detections(model, inputs)
    assert not all(torch.equal(c.scores, e.scores) for c, e in zip(changed, expected))
