"""Non-local ResNet backbones: detectron2's own ResNet and FPN, with non-local blocks inserted between residual blocks."""
import re
from collections import OrderedDict
from typing import Iterable, Sequence

from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, ResNet
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .config import nonlocal_block_kwargs
from .nonlocal_block import NonLocalArgumentError, NonLocalBlock2d

__all__ = [
    "add_nonlocal_blocks",
    "build_resnet_nl_backbone",
    "build_resnet_fpn_nl_backbone",
    "build_retinanet_resnet_fpn_nl_backbone",
    "nonlocal_module_name",
]


def nonlocal_module_name(block_index: int) -> str:
    """Name, inside its stage, of the non-local block that runs right before residual block ``block_index``."""
    return f"nonlocal{block_index}"


def add_nonlocal_blocks(
    resnet: ResNet, locations: Iterable[Sequence] = (("res4", -1),), **block_kwargs
) -> ResNet:
    """
    Insert :class:`NonLocalBlock2d` s into a detectron2 :class:`ResNet`, in place, and return it.

    Every existing parameter and buffer keeps its name (e.g. ``res4.5.conv1.weight``), so baseline
    checkpoints load unchanged; the block before residual block i of stage s is ``s.nonlocal{i}``.

    Args:
        resnet: a detectron2 ResNet (as ``build_resnet_backbone`` or ``ResNet(...)`` make it).
        locations: pairs ``(stage, i)``: one block right before residual block i of ``stage``
            ("res2".."res5"); i < 0 counts from the end. The default is the paper's Mask R-CNN
            placement, right before the last residual block of res4.
        block_kwargs: passed to :class:`NonLocalBlock2d` (mode, reduction, sub_sample,
            sub_sample_input, use_scale, norm).
    """
    placements = _resolve_locations(resnet, locations)
    for stage_name, indices in placements.items():
        stage = getattr(resnet, stage_name)
        blocks = list(stage.named_children())
        modules = OrderedDict()
        for name, block in blocks:
            # Residual blocks are named by their index; a non-local block added earlier keeps its place.
            if name.isdigit() and int(name) in indices:
                modules[nonlocal_module_name(int(name))] = NonLocalBlock2d(block.in_channels, **block_kwargs)
            modules[name] = block
        new_stage = nn.Sequential(modules)
        setattr(resnet, stage_name, new_stage)
        resnet.stages[resnet.stage_names.index(stage_name)] = new_stage
    return resnet


def _resolve_locations(resnet: ResNet, locations) -> "OrderedDict[str, set]":
    """Validate ``locations`` against ``resnet``; return {stage: {non-negative block index}}."""
    placements = OrderedDict()
    try:
        locations = [tuple(loc) for loc in locations]
    except TypeError:
        raise NonLocalArgumentError(
            "locations", locations, "must be a list of [stage, block_index] pairs"
        ) from None
    for loc in locations:
        if len(loc) != 2 or not isinstance(loc[0], str) or not _is_int(loc[1]):
            raise NonLocalArgumentError(
                "locations", list(loc), "each entry must be a [stage, block_index] pair, e.g. ['res4', -1]"
            )
        stage_name, index = loc
        if stage_name not in resnet.stage_names:
            hint = ""
            if re.fullmatch(r"res[2-5]", stage_name):
                hint = (
                    f" ({stage_name} is not built in this backbone: in C4 models res5 lives in the "
                    "ROI head, and ResNet drops stages after its last output feature)"
                )
            raise NonLocalArgumentError(
                "locations", stage_name,
                f"unknown stage{hint}; valid choices: {', '.join(resnet.stage_names)}",
            )
        stage = getattr(resnet, stage_name)
        num_blocks = len([n for n, _ in stage.named_children() if n.isdigit()])
        if not -num_blocks <= index < num_blocks:
            raise NonLocalArgumentError(
                "locations", list(loc),
                f"block index out of range: {stage_name} has {num_blocks} residual blocks in this "
                f"ResNet, so valid indices are {-num_blocks}..{num_blocks - 1}",
            )
        index %= num_blocks
        if index in placements.get(stage_name, ()):
            raise NonLocalArgumentError(
                "locations", list(loc),
                f"duplicate placement: {stage_name} block {index} already gets a non-local block",
            )
        if hasattr(stage, nonlocal_module_name(index)):
            raise NonLocalArgumentError(
                "locations", list(loc), f"{stage_name} already has a non-local block before block {index}"
            )
        if all(not p.requires_grad for p in stage.parameters()):
            raise NonLocalArgumentError(
                "locations", list(loc),
                f"{stage_name} is frozen (FREEZE_AT), so its non-local block would never leave its "
                "identity initialisation; unfreeze the stage or place the block in a later one",
            )
        placements.setdefault(stage_name, set()).add(index)
    return placements


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# cfg.MODEL.NONLOCAL key of each argument, for error messages that name what the user wrote.
_CFG_KEYS = {
    "locations": "LOCATIONS",
    "mode": "MODE",
    "reduction": "REDUCTION",
    "sub_sample": "SUBSAMPLE",
    "sub_sample_input": "SUBSAMPLE_INPUT",
    "use_scale": "USE_SCALE",
    "norm": "NORM",
}


def _check_freeze_at(cfg):
    """Refuse, before anything is built, a block in a stage that cfg.MODEL.BACKBONE.FREEZE_AT freezes."""
    freeze_at = cfg.MODEL.BACKBONE.FREEZE_AT
    for loc in cfg.MODEL.NONLOCAL.LOCATIONS:
        stage = str(loc[0]) if isinstance(loc, (list, tuple)) and loc else ""
        if re.fullmatch(r"res\d", stage) and int(stage[3]) <= freeze_at:
            raise ValueError(
                f"cfg.MODEL.BACKBONE.FREEZE_AT={freeze_at} freezes the stem and res2..res{freeze_at}, but "
                f"cfg.MODEL.NONLOCAL.LOCATIONS puts a non-local block in {stage}, where it would stay "
                f"frozen at its identity initialisation; use FREEZE_AT < {stage[3]} or another stage"
            )


def _add_nonlocal_blocks_from_cfg(cfg, resnet: ResNet) -> ResNet:
    try:
        return add_nonlocal_blocks(resnet, **nonlocal_block_kwargs(cfg))
    except NonLocalArgumentError as e:
        key = _CFG_KEYS.get(e.argument, e.argument)
        raise ValueError(
            f"cfg.MODEL.NONLOCAL.{key}: {e.argument}={e.value!r}: {e.reason}"
        ) from None


@BACKBONE_REGISTRY.register()
def build_resnet_nl_backbone(cfg, input_shape: ShapeSpec) -> ResNet:
    """detectron2's ``build_resnet_backbone`` (C4/DC5 models), plus the non-local blocks of ``cfg.MODEL.NONLOCAL``."""
    _check_freeze_at(cfg)
    return _add_nonlocal_blocks_from_cfg(cfg, build_resnet_backbone(cfg, input_shape))


@BACKBONE_REGISTRY.register()
def build_resnet_fpn_nl_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ``build_resnet_fpn_backbone``, with the non-local blocks of ``cfg.MODEL.NONLOCAL`` in its bottom-up ResNet."""
    return _fpn_with_nonlocal_blocks(build_resnet_fpn_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_retinanet_resnet_fpn_nl_backbone(cfg, input_shape: ShapeSpec):
    """detectron2's ``build_retinanet_resnet_fpn_backbone`` (P3-P7, for RetinaNet), with the non-local blocks of ``cfg.MODEL.NONLOCAL``."""
    return _fpn_with_nonlocal_blocks(build_retinanet_resnet_fpn_backbone, cfg, input_shape)


def _fpn_with_nonlocal_blocks(build_fpn, cfg, input_shape):
    _check_freeze_at(cfg)
    fpn = build_fpn(cfg, input_shape)
    _add_nonlocal_blocks_from_cfg(cfg, fpn.bottom_up)
    return fpn


def nonlocal_blocks(model: nn.Module) -> "OrderedDict[str, NonLocalBlock2d]":
    """The non-local blocks of ``model`` by qualified name, in forward order (e.g. ``backbone.bottom_up.res4.nonlocal5``)."""
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, NonLocalBlock2d))

