"""
tools/visualize_attention.py's cue_attention_share on the context-cue dataset: the share of attention that
object queries put on the cue's keys, against attention whose answer is known (uniform; all on one key).
"""
import importlib.util
import itertools
import json
import os

import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog

from nl_detectron import NonLocalBlock2d, nonlocal_blocks
from nl_detectron.config_files import build_model, load_config
from nl_detectron.data import CONTEXT_CLASSES, ensure_context, ensure_shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "quick", "mask_rcnn_nl_R18_context.yaml")
KEY_STRIDE = 32  # res4 (stride 16), keys max-pooled 2 x 2; the 320 x 96 images are seen at their size
NUM_KEYS = (96 // KEY_STRIDE) * (320 // KEY_STRIDE)  # 3 x 10
OPTS = ["MODEL.RPN.POST_NMS_TOPK_TEST", "20", "TEST.DETECTIONS_PER_IMAGE", "5"]
_ids = itertools.count()


def _load_tool():
    spec = importlib.util.spec_from_file_location("visualize_attention", os.path.join(REPO, "tools", "visualize_attention.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


@pytest.fixture(scope="module")
def val_cues():
    ensure_context("nl_context_val")
    with open(MetadataCatalog.get("nl_context_val").json_file) as f:
        return {image["id"]: image["cue"]["bbox"] for image in json.load(f)["images"]}


@pytest.fixture
def subset():
    """Register the given nl_context_val images (by id) as a dataset of their own, with the same json."""
    names = []

    def make(image_ids):
        name = f"nl_context_val_subset{next(_ids)}"
        DatasetCatalog.register(name, lambda: [r for r in DatasetCatalog.get("nl_context_val") if r["image_id"] in image_ids])
        MetadataCatalog.get(name).set(json_file=MetadataCatalog.get("nl_context_val").json_file, thing_classes=CONTEXT_CLASSES)
        names.append(name)
        return name

    yield make
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _weights(tmp_path, zero_theta=False):
    torch.manual_seed(0)
    model = build_model(load_config(CONFIG, OPTS))
    (block,) = nonlocal_blocks(model).values()
    if zero_theta:  # every logit theta(x_i) . phi(x_j) is 0: exactly uniform attention
        torch.nn.init.zeros_(block.theta.weight)
        torch.nn.init.zeros_(block.theta.bias)
    path = str(tmp_path / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def _cue_keys(bbox):
    """The key cells (row, col) that hold a pixel of the cue: pixel by pixel, as sets."""
    x, y, w, h = (int(v) for v in bbox)
    return {(py // KEY_STRIDE, px // KEY_STRIDE) for px in range(x, x + w) for py in range(y, y + h)}


def test_uniform_attention_puts_the_uniform_share_on_the_cue(tmp_path, val_cues, subset):
    cfg = load_config(CONFIG, OPTS)
    weights = _weights(tmp_path, zero_theta=True)
    one = tool.cue_attention_share(cfg, weights, subset([1]))
    assert one["images"] == 1 and one["block"] == "backbone.bottom_up.res4.nonlocal1"
    assert one["uniform_share"] == pytest.approx(len(_cue_keys(val_cues[1])) / NUM_KEYS)
    assert one["share"] == pytest.approx(one["uniform_share"], rel=1e-5)
    several = tool.cue_attention_share(cfg, weights, "nl_context_val", max_images=6)
    assert several["images"] == 6 and several["ratio"] == pytest.approx(1.0, rel=1e-5)
    assert several["queries"] >= 6  # at least one cell per object, one object per image at least


def test_attention_all_on_one_key_counts_where_that_key_is(tmp_path, val_cues, subset, monkeypatch):
    real = NonLocalBlock2d.pairwise_weights

    def all_on_the_top_left_key(self, x):
        weights, key_hw = real(self, x)
        peaked = torch.zeros_like(weights)
        peaked[..., 0] = 1.0
        return peaked, key_hw

    monkeypatch.setattr(NonLocalBlock2d, "pairwise_weights", all_on_the_top_left_key)
    cfg = load_config(CONFIG, OPTS)
    weights = _weights(tmp_path)
    on_cue = [i for i, box in val_cues.items() if (0, 0) in _cue_keys(box)][:2]
    off_cue = [i for i, box in val_cues.items() if (0, 0) not in _cue_keys(box)][:2]
    assert len(on_cue) == 2 and len(off_cue) == 2
    hit = tool.cue_attention_share(cfg, weights, subset(on_cue))
    assert hit["share"] == pytest.approx(1.0)
    assert hit["ratio"] == pytest.approx(1.0 / hit["uniform_share"])
    assert tool.cue_attention_share(cfg, weights, subset(off_cue))["share"] == 0.0


def test_only_datasets_with_cues_have_cues():
    ensure_context("nl_context_val")
    ensure_shapes("nl_shapes_val")
    assert tool.has_cues("nl_context_val")
    assert not tool.has_cues("nl_shapes_val")  # its json is there, without cues
