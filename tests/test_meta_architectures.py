"""
The non-local backbones in detectron2's other meta-architectures, chosen by config alone: each model is
built from a model-zoo (or this repo's) config with the non-local backbone named in MODEL.BACKBONE.NAME,
and takes one training step on a synthetic 64 px image; the losses are finite and the non-local block
receives gradients.
"""
import os

import pytest
import torch

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects import point_rend
from detectron2.structures import BitMasks, Boxes, Instances, Keypoints
from detectron2.utils.events import EventStorage

from nl_detectron import add_nonlocal_config, nonlocal_blocks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


def _zoo(path):
    return model_zoo.get_config_file(path)


def _repo(path):
    return os.path.join(REPO, "configs", path)


def _pointrend(cfg):
    # PointRend's configs are not in detectron2's wheel: its Base-PointRend-RCNN-FPN.yaml, as keys.
    cfg.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = True
    cfg.MODEL.ROI_MASK_HEAD.NAME = "PointRendMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE = ""  # the coarse head reads image features, no RoI pooling
    cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON = True
    cfg.MODEL.POINT_HEAD.NUM_CLASSES = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    cfg.INPUT.MASK_FORMAT = "bitmask"


# name: (config file, backbone to put in MODEL.BACKBONE.NAME or None to keep the file's, extra setup)
ARCHITECTURES = {
    "retinanet": (_zoo("COCO-Detection/retinanet_R_50_FPN_1x.yaml"), "build_retinanet_resnet_fpn_nl_backbone", None),
    "faster_rcnn": (_zoo("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"), "build_resnet_fpn_nl_backbone", None),
    "cascade_mask_rcnn": (_repo("cascade_mask_rcnn_nl_R50.yaml"), None, None),
    "keypoint_rcnn": (_zoo("COCO-Keypoints/keypoint_rcnn_R_50_FPN_1x.yaml"), "build_resnet_fpn_nl_backbone", None),
    "panoptic_fpn": (_zoo("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"), "build_resnet_fpn_nl_backbone", None),
    "pointrend": (_zoo("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"), "build_resnet_fpn_nl_backbone", _pointrend),
    "mask_rcnn_c4": (_zoo("COCO-InstanceSegmentation/mask_rcnn_R_50_C4_1x.yaml"), "build_resnet_nl_backbone", None),
}


def _cfg(config_file, backbone, extra):
    cfg = get_cfg()
    add_nonlocal_config(cfg)
    point_rend.add_pointrend_config(cfg)
    cfg.merge_from_file(config_file)
    if backbone is not None:
        cfg.MODEL.BACKBONE.NAME = backbone
    if extra is not None:
        extra(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    # Small work per step: few proposals and RoIs on a 64 px image.
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    return cfg


def _synthetic_input(cfg):
    """One training input: a 64 x 64 image with two objects, with whatever ground truth the model needs."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, SIZE, SIZE, generator=g) * 255
    boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [28.0, 20.0, 60.0, 58.0]])
    instances = Instances((SIZE, SIZE))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([0, 0] if cfg.MODEL.KEYPOINT_ON else [0, 2])
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0 + 2 : y1 - 2, x0 + 2 : x1 - 2] = True
    instances.gt_masks = BitMasks(masks)
    if cfg.MODEL.KEYPOINT_ON:
        k = cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS
        xy = boxes[:, None, :2] + torch.rand(2, k, 2, generator=g) * (boxes[:, None, 2:] - boxes[:, None, :2])
        instances.gt_keypoints = Keypoints(torch.cat([xy, torch.full((2, k, 1), 2.0)], dim=2))
    data = {"image": image, "height": SIZE, "width": SIZE, "instances": instances}
    if cfg.MODEL.META_ARCHITECTURE == "PanopticFPN":
        data["sem_seg"] = torch.randint(0, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, (SIZE, SIZE), generator=g)
    return data


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_one_training_step_with_the_nonlocal_backbone(name):
    torch.manual_seed(0)
    cfg = _cfg(*ARCHITECTURES[name])
    model = build_model(cfg)
    model.train()
    blocks = nonlocal_blocks(model)
    assert list(blocks) == ["backbone.bottom_up.res4.nonlocal5" if "c4" not in name else "backbone.res4.nonlocal5"]

    with EventStorage():  # the heads log training statistics into it
        losses = model([_synthetic_input(cfg)])
    expected = {
        "retinanet": {"loss_cls", "loss_box_reg"},
        "keypoint_rcnn": {"loss_keypoint"},
        "panoptic_fpn": {"loss_sem_seg", "loss_mask"},
        "pointrend": {"loss_mask", "loss_mask_point"},
        "cascade_mask_rcnn": {"loss_cls_stage2", "loss_mask"},
    }.get(name, {"loss_cls", "loss_rpn_cls"})
    assert expected <= set(losses), sorted(losses)
    for key, value in losses.items():
        assert torch.isfinite(value), (key, value)
    sum(losses.values()).backward()

    (block,) = blocks.values()
    # W_z starts at zero (identity block), so it is W_z that must get a gradient from the losses.
    assert block.w_z.weight.grad is not None and torch.count_nonzero(block.w_z.weight.grad) > 0
    assert torch.isfinite(block.w_z.weight.grad).all()
