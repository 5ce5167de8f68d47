"""
A literal reference for the non-local block: the paper's equations written out with the full pairwise
matrix f(x_i, x_j), independently of nl_detectron's code (which it only reads the weights of).

Wang et al., "Non-local Neural Networks", eq. 1 and 6:
    y_i = 1/C(x) * sum_j f(x_i, x_j) g(x_j),    z_i = x_i + W_z y_i,
with f and C(x) per instantiation (section 3.2) and, with subsampling, keys j running over a 2x2
max-pool of phi(x) and g(x) (section 3.3), or over phi and g of a 2x2 max-pool of x (the authors' code).
"""
import math

import torch
import torch.nn.functional as F

WEIGHT_NAMES = (
    "theta.weight", "theta.bias", "phi.weight", "phi.bias", "g.weight", "g.bias",
    "concat_project.weight", "w_z.weight", "w_z.bias",
)


def block_weights(block, dtype=None):
    """
    The block's weights as fresh leaf tensors (detached copies that require grad), keyed by
    :data:`WEIGHT_NAMES`; a weight the block does not have is None. The norm after W_z is not included.
    """
    params = dict(block.named_parameters())
    weights = {}
    for name in WEIGHT_NAMES:
        p = params.get(name)
        if p is not None:
            p = p.detach().clone().to(dtype or p.dtype).requires_grad_(True)
        weights[name] = p
    return weights


def pointwise_conv(x, weight, bias):
    """A 1x1 convolution as the per-position linear map it is: (B, C_in, N) -> (B, C_out, N)."""
    out = torch.einsum("oc,bcn->bon", weight.flatten(1), x)
    return out if bias is None else out + bias[None, :, None]


def max_pool_2x2_ceil(x):
    """
    2x2 max-pool with stride 2 that keeps the last row/column of odd-sized maps (ceil mode):
    pad to even sizes with -inf, then take the max over each 2x2 cell.
    """
    b, c, h, w = x.shape
    h2, w2 = -(-h // 2), -(-w // 2)
    padded = x.new_full((b, c, 2 * h2, 2 * w2), float("-inf"))
    padded[:, :, :h, :w] = x
    return padded.reshape(b, c, h2, 2, w2, 2).amax(dim=(3, 5))


def embeddings(x, weights, *, mode, sub_sample, sub_sample_input=False):
    """
    theta (B, N, d) over the query positions, phi (B, N', d) and g (B, N', C') over the key positions;
    positions are flattened row-major (i = row * W + column). ``sub_sample_input``: the authors' code's
    variant, phi and g of the max-pooled x instead of the max-pool of phi(x) and g(x).
    """
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    keys = max_pool_2x2_ceil(x) if sub_sample and sub_sample_input else x
    hk, wk = keys.shape[-2:]
    keys_flat = keys.reshape(b, c, hk * wk)
    if mode == "gaussian":  # f compares the inputs themselves
        theta, phi = flat, keys
    else:
        theta = pointwise_conv(flat, weights["theta.weight"], weights["theta.bias"])
        phi = pointwise_conv(keys_flat, weights["phi.weight"], weights["phi.bias"]).reshape(b, -1, hk, wk)
    g = pointwise_conv(keys_flat, weights["g.weight"], weights["g.bias"]).reshape(b, -1, hk, wk)
    if sub_sample and not sub_sample_input:
        phi, g = max_pool_2x2_ceil(phi), max_pool_2x2_ceil(g)
    return theta.transpose(1, 2), phi.flatten(2).transpose(1, 2), g.flatten(2).transpose(1, 2)


def pairwise_matrix(theta, phi, weights, *, mode, use_scale, query_chunk=None):
    """
    f(x_i, x_j) / C(x) for every query i and key j: (B, N, N').

    ``query_chunk`` only bounds the memory of the concatenation form (it builds the
    (B, 2C', n, N') tensor of concatenated pairs for n queries at a time); the result does not depend on it.
    """
    num_keys = phi.shape[1]
    if mode in ("embedded_gaussian", "gaussian"):
        # exp(s theta_i . phi_j) / sum_j exp(s theta_i . phi_j); subtracting the row max from every
        # exponent leaves the ratio unchanged and keeps exp finite.
        s = 1.0 / math.sqrt(theta.shape[-1]) if use_scale else 1.0
        logits = torch.einsum("bnd,bmd->bnm", theta, phi) * s
        e = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
        return e / e.sum(dim=-1, keepdim=True)
    if mode == "dot_product":
        return torch.einsum("bnd,bmd->bnm", theta, phi) / num_keys
    if mode == "concatenation":
        w_f = weights["concat_project.weight"].reshape(-1)  # (2C',)
        n = theta.shape[1]
        step = query_chunk or n
        rows = []
        for start in range(0, n, step):
            t = theta[:, start : start + step]
            b, m, d = t.shape
            # [theta_i, phi_j] for every pair (i, j): (B, 2C', m, N').
            pairs = torch.cat(
                [
                    t.transpose(1, 2)[:, :, :, None].expand(b, d, m, num_keys),
                    phi.transpose(1, 2)[:, :, None, :].expand(b, d, m, num_keys),
                ],
                dim=1,
            )
            rows.append(F.relu(torch.einsum("k,bknm->bnm", w_f, pairs)))
        return torch.cat(rows, dim=1) / num_keys
    raise ValueError(f"mode={mode!r}: unknown")


def reference_pairwise(x, weights, *, mode, sub_sample, use_scale, sub_sample_input=False, query_chunk=None):
    """The normalised pairwise weights (B, N, N') of the block with ``weights`` on input ``x``."""
    theta, phi, _ = embeddings(x, weights, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input)
    return pairwise_matrix(theta, phi, weights, mode=mode, use_scale=use_scale, query_chunk=query_chunk)


def reference_nonlocal(
    x, weights, *, mode, sub_sample, use_scale, sub_sample_input=False, norm=None, query_chunk=None
):
    """
    z = x + norm(W_z y) with y = f g, computed with the full pairwise matrix.

    Args:
        x: (B, C, H, W).
        weights: as returned by :func:`block_weights`.
        norm: a callable applied after the W_z convolution (e.g. :func:`batch_norm_eval`), or None.
    """
    b, c, h, w = x.shape
    theta, phi, g = embeddings(x, weights, mode=mode, sub_sample=sub_sample, sub_sample_input=sub_sample_input)
    f = pairwise_matrix(theta, phi, weights, mode=mode, use_scale=use_scale, query_chunk=query_chunk)
    y = torch.einsum("bnm,bmc->bcn", f, g)  # (B, C', N)
    wy = pointwise_conv(y, weights["w_z.weight"], weights["w_z.bias"]).reshape(b, c, h, w)
    if norm is not None:
        wy = norm(wy)
    return x + wy


def batch_norm_eval(weight, bias, running_mean, running_var, eps):
    """BatchNorm in inference: a per-channel affine map with the running statistics."""

    def apply(t):
        shape = (1, -1, 1, 1)
        return (t - running_mean.view(shape)) / torch.sqrt(running_var.view(shape) + eps) * weight.view(
            shape
        ) + bias.view(shape)

    return apply


def group_norm(num_groups, weight, bias, eps):
    """GroupNorm: normalise each sample's channel groups over (channels in group, H, W)."""

    def apply(t):
        b, c, h, w = t.shape
        grouped = t.reshape(b, num_groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        var = grouped.var(dim=-1, unbiased=False, keepdim=True)
        normed = ((grouped - mean) / torch.sqrt(var + eps)).reshape(b, c, h, w)
        return normed * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    return apply
