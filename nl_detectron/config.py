"""``cfg.MODEL.NONLOCAL``: the config keys of the non-local backbones, and their translation to arguments."""
from detectron2.config import CfgNode as CN

__all__ = ["add_nonlocal_config", "nonlocal_block_kwargs"]


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


def nonlocal_block_kwargs(cfg):
    """The keyword arguments of :func:`nl_detectron.add_nonlocal_blocks` that ``cfg`` asks for."""
    nl = cfg.MODEL.NONLOCAL
    return dict(
        locations=[tuple(loc) for loc in nl.LOCATIONS],
        mode=nl.MODE,
        reduction=nl.REDUCTION,
        sub_sample=nl.SUBSAMPLE,
        sub_sample_input=nl.SUBSAMPLE_INPUT,
        use_scale=nl.USE_SCALE,
        norm=nl.NORM,
    )
