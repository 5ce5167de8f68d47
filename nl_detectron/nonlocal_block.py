"""The non-local block of Wang et al., "Non-local Neural Networks" (CVPR 2018), for 2-D feature maps."""
import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d, get_norm

from .layout import for_convolutions, residual_sum, rows, rows_to_map
from .pairwise import concatenation_attention, dot_product_attention, gaussian_attention, softmax_attention
from .subsample import max_pool_2x2

__all__ = ["NonLocalBlock2d", "NonLocalArgumentError", "NONLOCAL_MODES", "NONLOCAL_NORMS"]

NONLOCAL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
# detectron2's norm names (detectron2.layers.get_norm). "FrozenBN" is left out on purpose: a frozen
# norm whose scale starts at zero would keep the block an identity mapping forever.
NONLOCAL_NORMS = ("", "BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "GN", "LN")


class NonLocalBlock2d(nn.Module):
    """
    ``z = x + W_z(y)`` with ``y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j)`` (paper, eq. 1 and 6).

    Positions i run over the H x W input; positions j over the keys, which are the input's positions or,
    with ``sub_sample``, those of a 2x2 max-pool of phi(x) and g(x) (paper, section 3.3), or, with
    ``sub_sample_input`` as well, phi and g of a 2x2 max-pool of x (the authors' released code).
    ``mode`` picks the pairwise function f and its normaliser C(x) (paper, section 3.2):

    * ``embedded_gaussian``: softmax_j(theta(x_i)^T phi(x_j) * s), the paper's default.
    * ``gaussian``: softmax_j(x_i^T x_j * s), no theta/phi embeddings (keys still max-pooled).
    * ``dot_product``: theta(x_i)^T phi(x_j) / N', N' the number of keys.
    * ``concatenation``: ReLU(w_f^T [theta(x_i), phi(x_j)]) / N'.

    ``s`` is ``1/sqrt(d)`` (d: channels of the dot product) when ``use_scale``, else 1.

    The pairwise aggregation runs in :mod:`nl_detectron.pairwise`, which keeps the N x N' matrix for
    backward or never keeps it, by one cost rule (:func:`~nl_detectron.pairwise.materialise_pairwise`);
    :meth:`pairwise_weights` materialises the matrix when one wants to see it.

    The block is an identity mapping at initialisation: W_z is zero when ``norm`` is empty, otherwise
    the scale of the norm after W_z is zero (paper, section 4.1).
    """

    def __init__(
        self,
        in_channels: int,
        *,
        mode: str = "embedded_gaussian",
        reduction: int = 2,
        sub_sample: bool = True,
        sub_sample_input: bool = False,
        use_scale: bool = True,
        norm: str = "",
    ):
        """
        Args:
            in_channels: channels C of the input (and output).
            mode: one of :data:`NONLOCAL_MODES`.
            reduction: theta, phi and g have ``in_channels // reduction`` channels (the paper: 2).
            sub_sample: 2x2 max-pool phi(x) and g(x), so there are ~4x fewer keys (the paper: yes).
            sub_sample_input: with ``sub_sample``, max-pool x before the phi and g convolutions
                instead of pooling their outputs: what the authors' code does (the paper's text pools
                after phi and g). Same key grid, a quarter of the phi/g multiply-adds, different values
                (max-pooling does not commute with a convolution).
            use_scale: scale the softmax logits by 1/sqrt(d). The paper does not; the authors'
                released code does, and unscaled logits of 512-d embeddings saturate the softmax (and
                overflow float16 wherever they are materialised), hence the default True. Only used by
                the softmax modes.
            norm: norm after W_z, by detectron2's name (one of :data:`NONLOCAL_NORMS`); "" for none.
        """
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_choice("mode", mode, NONLOCAL_MODES)
        _check_int("reduction", reduction)
        _check_choice("norm", norm, NONLOCAL_NORMS)
        _check_bool("sub_sample", sub_sample)
        _check_bool("sub_sample_input", sub_sample_input)
        if sub_sample_input and not sub_sample:
            raise NonLocalArgumentError(
                "sub_sample_input", sub_sample_input,
                "chooses where the subsampling max-pool goes, so it needs sub_sample=True "
                "(got sub_sample=False); valid choices here: False",
            )
        _check_bool("use_scale", use_scale)
        if in_channels % reduction != 0:
            raise NonLocalArgumentError(
                "reduction", reduction,
                f"must divide in_channels={in_channels} so that the inner channels "
                f"in_channels // reduction are a positive integer (here {in_channels / reduction:g}); "
                f"valid choices: {', '.join(str(d) for d in range(1, in_channels + 1) if in_channels % d == 0)}",
            )
        inner = in_channels // reduction
        if norm == "GN" and in_channels % 32 != 0:
            raise NonLocalArgumentError(
                "norm", norm, f"uses 32 groups, which must divide in_channels={in_channels}"
            )
        self.in_channels = in_channels
        self.inner_channels = inner
        self.mode = mode
        self.sub_sample = bool(sub_sample)
        self.sub_sample_input = bool(sub_sample_input)
        self.use_scale = bool(use_scale)

        # Gaussian compares the inputs themselves: theta and phi are the identity.
        embedded = mode != "gaussian"
        self.theta = nn.Conv2d(in_channels, inner, 1) if embedded else None
        self.phi = nn.Conv2d(in_channels, inner, 1) if embedded else None
        self.g = nn.Conv2d(in_channels, inner, 1)
        # w_f of the concatenation form, split as [w_theta, w_phi] so that
        # w_f^T [theta_i, phi_j] = w_theta^T theta_i + w_phi^T phi_j.
        self.concat_project = nn.Linear(2 * inner, 1, bias=False) if mode == "concatenation" else None
        self.w_z = Conv2d(inner, in_channels, 1, bias=not norm, norm=get_norm(norm, in_channels))

        # The authors' code: Gaussian(0, 0.01) weights, zero biases, zero-initialised output.
        for m in (self.theta, self.phi, self.g, self.concat_project):
            if m is not None:
                nn.init.normal_(m.weight, std=0.01)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if norm:
            nn.init.normal_(self.w_z.weight, std=0.01)
            nn.init.zeros_(self.w_z.norm.weight)
            nn.init.zeros_(self.w_z.norm.bias)
        else:
            nn.init.zeros_(self.w_z.weight)
            nn.init.zeros_(self.w_z.bias)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, inner_channels={self.inner_channels}, "
            f"mode={self.mode}, sub_sample={self.sub_sample}, sub_sample_input={self.sub_sample_input}, "
            f"use_scale={self.use_scale}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, C, H, W) with C == in_channels.

        Returns:
            (B, C, H, W): ``x + W_z(y)``.
        """
        _, _, h, w = self._check_input(x).shape
        query, key, value = self._embed(x)
        y = self._aggregate(query, key, value)  # (B, H*W, inner)
        # y's rows seen as a channels-last map (a view): oneDNN's 1x1 convolution takes that layout as it
        # is, where an NCHW input costs it reorder buffers of the input's and output's size.
        # The sum in x's memory layout (the block's output and x's gradient keep it); W_z's output is not
        # held here, so that its copy in that layout replaces it rather than adding to the peak memory.
        return residual_sum(x, self.w_z(rows_to_map(y.contiguous(), (h, w))))

    @torch.no_grad()
    def pairwise_weights(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """
        The normalised pairwise weights f(x_i, x_j) / C(x) that :meth:`forward` applies, materialised.
        For inspection (e.g. tools/visualize_attention.py).

        Args:
            x: (B, C, H, W), the block's input.

        Returns:
            weights: (B, H*W, N') with N' = Hk*Wk keys; rows sum to 1 in the softmax modes.
            (Hk, Wk): the key grid.
        """
        self._check_input(x)
        query, key, _ = self._embed(x)
        if query.dtype in (torch.float16, torch.bfloat16):  # keep float64 as it is
            query, key = query.float(), key.float()
        if self.mode in ("embedded_gaussian", "gaussian"):
            weights = torch.softmax(query @ key.transpose(1, 2) * self._scale(query), dim=-1)
        elif self.mode == "dot_product":
            weights = query @ key.transpose(1, 2) / key.shape[1]
        else:
            w_theta, w_phi = self.concat_project.weight.to(query.dtype).chunk(2, dim=1)
            u, v = query @ w_theta.t(), key @ w_phi.t()  # (B, N, 1), (B, N', 1)
            weights = F.relu(u + v.transpose(1, 2)) / key.shape[1]
        return weights, self.key_grid(x.shape[-2], x.shape[-1])

    def key_grid(self, height: int, width: int) -> Tuple[int, int]:
        """(Hk, Wk): the key positions' grid for an input of ``height`` x ``width``."""
        if self.sub_sample:
            return math.ceil(height / 2), math.ceil(width / 2)
        return height, width

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"NonLocalBlock2d expects a 4-D input (B, C, H, W); got x with shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"NonLocalBlock2d was built with in_channels={self.in_channels}; "
                f"got x with {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        return x

    def _embed(self, x: torch.Tensor):
        """
        query theta(x) (B, N, d), key phi(x) (B, N', d) and value g(x) (B, N', inner), one row per position
        (views of the convolutions' maps). ``gaussian`` compares x itself: its query and key are x.
        """
        pool = max_pool_2x2  # ceil mode: odd-sized maps keep their last row/column as keys
        keys_from = pool(x) if self.sub_sample_input else x  # the authors' order: pool x, then phi and g
        # What theta, phi and g convolve: their input in the layout they run fastest on (see layout.py).
        num_keys = math.prod(self.key_grid(*x.shape[-2:]))
        if self.mode == "gaussian":
            query, key, value = x, keys_from, self.g(for_convolutions(keys_from, 1, num_keys))
        else:
            if keys_from is x:  # one copy for all three
                x_conv = keys_conv = for_convolutions(x, 3, num_keys)
            else:
                x_conv = for_convolutions(x, 1, num_keys)
                keys_conv = for_convolutions(keys_from, 2, num_keys)
            query, key, value = self.theta(x_conv), self.phi(keys_conv), self.g(keys_conv)
        if self.sub_sample and not self.sub_sample_input:  # the paper's order: phi and g, then pool
            key, value = pool(key), pool(value)
        return rows(query), rows(key), rows(value)

    def _scale(self, query: torch.Tensor) -> float:
        return 1.0 / math.sqrt(query.shape[-1]) if self.use_scale else 1.0

    def _aggregate(self, query, key, value):
        """y = 1/C(x) sum_j f(x_i, x_j) g(x_j): (B, N, d), (B, N', d), (B, N', inner) -> (B, N, inner)."""
        if self.mode == "embedded_gaussian":
            return softmax_attention(query, key, value, self._scale(query))
        if self.mode == "gaussian":
            return gaussian_attention(query, key, value, self._scale(query))
        if self.mode == "dot_product":
            return dot_product_attention(query, key, value)
        w_theta, w_phi = self.concat_project.weight.chunk(2, dim=1)
        return concatenation_attention(query, key, value, w_theta, w_phi)


class NonLocalArgumentError(ValueError):
    """A bad argument of the non-local block or backbone; ``argument`` names it, ``value`` is what was given."""

    def __init__(self, argument: str, value, reason: str):
        self.argument, self.value, self.reason = argument, value, reason
        super().__init__(f"{argument}={value!r}: {reason}")


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NonLocalArgumentError(name, value, "must be a positive integer")


def _check_bool(name, value):
    # Not bool(value): a string such as "False" would silently mean True.
    if not isinstance(value, (bool, np.bool_)):
        raise NonLocalArgumentError(name, value, "must be a bool; valid choices: True, False")


def _check_choice(name, value, choices):
    if value not in choices:
        raise NonLocalArgumentError(
            name, value, f"unknown value; valid choices: {', '.join(repr(c) for c in choices)}"
        )
