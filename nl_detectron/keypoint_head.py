"""Keypoint R-CNN's keypoint head with non-local blocks (paper, Table 6): detectron2's
KRCNNConvDeconvUpsampleHead with :class:`NonLocalBlock2d` s after chosen convolutions."""
from collections import OrderedDict
from typing import Dict, Sequence

from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_KEYPOINT_HEAD_REGISTRY
from detectron2.modeling.roi_heads.keypoint_head import KRCNNConvDeconvUpsampleHead

from .backbone import _CFG_KEYS
from .config import nonlocal_keypoint_head_kwargs
from .nonlocal_block import NonLocalArgumentError, NonLocalBlock2d

__all__ = ["KRCNNConvDeconvUpsampleNLHead", "keypoint_head_block_name"]

# cfg.MODEL.NONLOCAL.KEYPOINT_HEAD key of each argument, for error messages that name what the user wrote.
_HEAD_CFG_KEYS = dict({k: v for k, v in _CFG_KEYS.items() if k != "locations"}, after_convs="AFTER_CONVS")


def keypoint_head_block_name(conv_index: int) -> str:
    """Name, inside the head, of the non-local block right after convolution ``conv_fcn{conv_index}``."""
    return f"nonlocal{conv_index}"


def _check_after_convs(argument: str, after_convs, num_convs: int) -> list:
    """``after_convs`` as a list, if it names distinct convolutions 1..num_convs of the head."""
    valid = f"valid choices: 1..{num_convs} (conv_fcn1..conv_fcn{num_convs})" if num_convs else (
        "the head has no convolutions (MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS is empty), so no block can go "
        "in it; valid choices: []"
    )
    try:
        after_convs = list(after_convs)
    except TypeError:
        raise NonLocalArgumentError(argument, after_convs, f"must be a list of convolution indices; {valid}") from None
    seen = set()
    for index in after_convs:
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= num_convs:
            raise NonLocalArgumentError(
                argument, after_convs,
                f"{index!r} is not a convolution of this head, which has {num_convs}; {valid}",
            )
        if index in seen:
            raise NonLocalArgumentError(
                argument, after_convs, f"duplicate placement: conv_fcn{index} already gets a non-local block"
            )
        seen.add(index)
    return after_convs


@ROI_KEYPOINT_HEAD_REGISTRY.register()
class KRCNNConvDeconvUpsampleNLHead(KRCNNConvDeconvUpsampleHead):
    """
    detectron2's :class:`KRCNNConvDeconvUpsampleHead` (3x3 convolutions ``conv_fcn{k}``, each with a ReLU,
    then a transposed convolution and a bilinear 2x upsampling) with a module, typically a
    :class:`NonLocalBlock2d`, right after the ReLU of chosen convolutions. The module after conv k is
    ``nonlocal{k}``; every baseline parameter keeps its name (``conv_fcn1.weight``, ``score_lowres.bias``),
    so detectron2 Keypoint R-CNN checkpoints load with only the blocks' own parameters missing.

    Each block sees the RoI features of one region: (R, C, 14, 14) for R regions at detectron2's pooler
    resolution, attending over the 14 x 14 positions of its own region only.
    """

    @configurable
    def __init__(
        self, input_shape: ShapeSpec, *, num_keypoints: int, conv_dims: Sequence[int],
        nonlocal_blocks: Dict[int, nn.Module], **kwargs,
    ):
        """
        Args:
            input_shape, num_keypoints, conv_dims, kwargs: as for :class:`KRCNNConvDeconvUpsampleHead`.
            nonlocal_blocks: {k: module}: the module that runs right after the ReLU of conv k
                (1-based: 1..len(conv_dims)); it must keep the shape (R, conv_dims[k - 1], H, W).
        """
        super().__init__(input_shape, num_keypoints=num_keypoints, conv_dims=conv_dims, **kwargs)
        _check_after_convs("nonlocal_blocks", nonlocal_blocks, len(conv_dims))
        # nn.Sequential runs its children in registration order (the parent's layers() iterates over
        # them): re-register them with each block right after its convolution's ReLU.
        children = list(self.named_children())
        for name, _ in children:
            delattr(self, name)
        for name, module in children:
            self.add_module(name, module)
            if name.startswith("conv_fcn_relu") and int(name[len("conv_fcn_relu"):]) in nonlocal_blocks:
                index = int(name[len("conv_fcn_relu"):])
                self.add_module(keypoint_head_block_name(index), nonlocal_blocks[index])

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        kwargs = nonlocal_keypoint_head_kwargs(cfg)
        conv_dims = list(ret["conv_dims"])
        try:
            after_convs = _check_after_convs("after_convs", kwargs.pop("after_convs"), len(conv_dims))
            ret["nonlocal_blocks"] = OrderedDict(
                (k, NonLocalBlock2d(conv_dims[k - 1], **kwargs)) for k in sorted(after_convs)
            )
        except NonLocalArgumentError as e:
            key = _HEAD_CFG_KEYS.get(e.argument, e.argument)
            raise ValueError(
                f"cfg.MODEL.NONLOCAL.KEYPOINT_HEAD.{key}: {e.argument}={e.value!r}: {e.reason}"
            ) from None
        return ret
