"""Layout helpers of the non-local block: (B, C, H, W) maps as rows (B, H*W, C) and back."""
import torch

__all__ = ["rows", "rows_to_map"]


def rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), a view: one row per position."""
    return t.flatten(2).transpose(1, 2)


def rows_to_map(t: torch.Tensor, size) -> torch.Tensor:
    """
    (B, H*W, C) rows -> (B, C, H, W): a view for contiguous rows (channels-last strides) and for the rows
    view of an NCHW map (NCHW strides); a copy otherwise.
    """
    b, _, c = t.shape
    return t.transpose(1, 2).reshape(b, c, *size)
