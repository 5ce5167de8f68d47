"""``cfg.MODEL.NONLOCAL``: the config keys of the non-local backbones, and their translation to arguments."""
from detectron2.config import CfgNode as CN

__all__ = ["add_nonlocal_config", "nonlocal_block_kwargs", "nonlocal_keypoint_head_kwargs"]


def add_nonlocal_config(cfg):
    """
    Add ``cfg.MODEL.NONLOCAL``. The defaults are the paper's Mask R-CNN setup (Table 5): one
    embedded-Gaussian block, right before the last residual block of res4, subsampled as the paper's text
    says. The Table 5 configs in configs/ also set SUBSAMPLE_INPUT, the authors' code's order.
    """
    _C = cfg
    _C.MODEL.NONLOCAL = CN()
    # Where the blocks go: a list of [stage, i], each inserting one block right before residual block i
    # of that stage ("res2".."res5"); i < 0 counts from the end, so ["res4", -1] is "right before the
    # last residual block of res4" whatever the depth (ResNet-50: before res4 block 5).
    _C.MODEL.NONLOCAL.LOCATIONS = [["res4", -1]]
    # The NonLocalBlock2d arguments (see nl_detectron/nonlocal_block.py).
    _C.MODEL.NONLOCAL.MODE = "embedded_gaussian"
    _C.MODEL.NONLOCAL.REDUCTION = 2
    _C.MODEL.NONLOCAL.SUBSAMPLE = True
    # With SUBSAMPLE, max-pool x before the phi/g convolutions (the authors' code) instead of pooling
    # phi(x) and g(x) (the paper's text): a quarter of their multiply-adds, different values. The Table 5
    # configs set it: it keeps one block within the paper's "<5% computation" at 800 x 1333.
    _C.MODEL.NONLOCAL.SUBSAMPLE_INPUT = False
    _C.MODEL.NONLOCAL.USE_SCALE = True
    # Norm after W_z. "" (none, W_z zero-initialised) suits detection's 2 images per GPU and frozen
    # backbone BN, as the authors' "affine" configs do; "BN"/"SyncBN"/"GN" start with a zero scale.
    _C.MODEL.NONLOCAL.NORM = ""
    _add_keypoint_head_config(_C)


def nonlocal_block_kwargs(cfg):
    """The keyword arguments of :func:`nl_detectron.add_nonlocal_blocks` that ``cfg`` asks for."""
    nl = cfg.MODEL.NONLOCAL
    return dict(locations=[tuple(loc) for loc in nl.LOCATIONS], **_block_kwargs(nl))


def _add_keypoint_head_config(cfg):
    """
    ``cfg.MODEL.NONLOCAL.KEYPOINT_HEAD``: the blocks of the ``KRCNNConvDeconvUpsampleNLHead`` keypoint head
    (nl_detectron/keypoint_head.py), read only when ``MODEL.ROI_KEYPOINT_HEAD.NAME`` names it. The defaults
    are the paper's Table 6 head: 4 embedded-Gaussian blocks, one after every 2 of the 8 convolutions.
    """
    head = cfg.MODEL.NONLOCAL.KEYPOINT_HEAD = CN()
    # Convolutions (1-based, as detectron2 names them conv_fcn1..conv_fcnN) after whose ReLU a block goes;
    # the block after conv_fcn{k} is nonlocal{k}.
    head.AFTER_CONVS = [2, 4, 6, 8]
    head.MODE = "embedded_gaussian"
    head.REDUCTION = 2
    # No subsampling by default: on a 14 x 14 RoI map the pairwise term is a small part of a block's cost
    # (the 1x1 embeddings dominate), while 2x2-pooled keys (7 x 7) would coarsen what keypoints need most,
    # position. The paper does not say what it did here.
    head.SUBSAMPLE = False
    head.SUBSAMPLE_INPUT = False
    head.USE_SCALE = True
    # The head has no norm layers (detectron2's has none either): W_z zero-initialised, as the backbone's.
    head.NORM = ""


def nonlocal_keypoint_head_kwargs(cfg):
    """``after_convs`` and the :class:`~nl_detectron.NonLocalBlock2d` arguments of ``cfg.MODEL.NONLOCAL.KEYPOINT_HEAD``."""
    head = cfg.MODEL.NONLOCAL.KEYPOINT_HEAD
    return dict(after_convs=list(head.AFTER_CONVS), **_block_kwargs(head))


def _block_kwargs(node):
    """The :class:`~nl_detectron.NonLocalBlock2d` arguments of a config node with the block's keys."""
    return dict(
        mode=node.MODE,
        reduction=node.REDUCTION,
        sub_sample=node.SUBSAMPLE,
        sub_sample_input=node.SUBSAMPLE_INPUT,
        use_scale=node.USE_SCALE,
        norm=node.NORM,
    )
