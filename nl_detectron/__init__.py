"""nl_detectron: the non-local block of Wang et al. (CVPR 2018) for detectron2."""
from .nonlocal_block import NONLOCAL_MODES, NONLOCAL_NORMS, NonLocalArgumentError, NonLocalBlock2d
from .config import add_nonlocal_config, nonlocal_block_kwargs, nonlocal_keypoint_head_kwargs
from .backbone import (
    add_nonlocal_blocks,
    build_resnet_fpn_nl_backbone,
    build_resnet_nl_backbone,
    build_retinanet_resnet_fpn_nl_backbone,
    nonlocal_blocks,
)
from .keypoint_head import KRCNNConvDeconvUpsampleNLHead, keypoint_head_block_name
from . import data  # registers the built-in dataset  # noqa: F401

__version__ = "0.1.0"
