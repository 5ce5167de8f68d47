#!/usr/bin/env python
"""
Show where a non-local block looks: for chosen query points of an image, the block's normalised pairwise
weights f(x_i, x_j) / C(x) over all key positions j, overlaid on the image.

    tools/visualize_attention.py --config-file configs/quick/mask_rcnn_nl_R18_shapes.yaml \
        --weights output/quick_mask_rcnn_nl_R18_shapes/model_final.pth --point 60,80 --point 200,40

Writes to --output: one PNG per query (the image, the map over it, the query marked with a white
cross), ``summary.png`` (all queries on one sheet) and ``attention.npz`` (the raw maps, for analysis).
The softmax modes' maps sum to 1 over the keys; dot_product's and concatenation's are f / N' and
are shown with their own minimum to maximum.

A block in the keypoint head (configs/keypoint_rcnn_nl_head_R101.yaml, configs/quick/keypoint_rcnn_nl_R18_houses.yaml)
sees one RoI at a time, a 14 x 14 map of one detection: for such a --block, --roi picks the detection (by
score, 0 = the best), the query points must lie in its box (default: an N x N grid over it), and each map
is shown over that box only:

    tools/visualize_attention.py --config-file configs/quick/keypoint_rcnn_nl_R18_houses.yaml \
        --weights output/quick_keypoint_rcnn_nl_R18_houses/model_final.pth \
        --block roi_heads.keypoint_head.nonlocal8 --roi 0

Nothing in the model records attention during normal inference: this tool registers a forward hook
on the chosen block to catch its input, removes it after the one forward pass, and asks the block for
its weights (NonLocalBlock2d.pairwise_weights).
"""
import argparse
import json
import logging
import os
import sys
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

from nl_detectron import nonlocal_blocks
from nl_detectron.checkpoint import SafeCheckpointer
from nl_detectron.config_files import build_model, inference_mapper, load_config
from nl_detectron.data import ensure_shapes

logger = logging.getLogger("nl_detectron.visualize_attention")

DEFAULT_IMAGE_DATASET = "nl_shapes_val"
OVERLAY_ALPHA = 0.5
COLORMAP = "inferno"


def default_image() -> str:
    """The first image of the built-in dataset's val split (generated if absent)."""
    ensure_shapes(DEFAULT_IMAGE_DATASET)
    image_root = MetadataCatalog.get(DEFAULT_IMAGE_DATASET).image_root
    return os.path.join(image_root, sorted(os.listdir(image_root))[0])


def grid_points(width: int, height: int, n: int) -> List[Tuple[int, int]]:
    """An n x n grid of (x, y) pixel positions at the centres of n x n equal cells of the image."""
    return [
        (int((col + 0.5) * width / n), int((row + 0.5) * height / n))
        for row in range(n)
        for col in range(n)
    ]


def parse_point(text: str) -> Tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--point: {text!r} is not 'x,y' with integer pixel coordinates")
    return x, y


@torch.no_grad()
def find_block(model, block_name: str):
    """The non-local block ``block_name`` of ``model``; a ValueError listing the valid names if none."""
    blocks = nonlocal_blocks(model)
    if block_name not in blocks:
        raise ValueError(
            f"--block {block_name!r}: no such non-local block in this model; valid choices: "
            f"{', '.join(blocks) or '(none: the config builds no non-local block)'}"
        )
    return blocks[block_name]


def attention_maps(model, block_name: str, model_input: dict, points: Sequence[Tuple[int, int]]):
    """
    Run ``model`` (in eval mode) on one input, catch the input of non-local block ``block_name``, and
    return the block's pairwise weights for the feature cells under ``points``.

    Args:
        model_input: one detectron2 model input dict: "image" (C, h', w') resized by the test mapper,
            "height"/"width" the original image size in which ``points`` are given (x, y).

    Returns:
        dict with "maps" (Q, Hk, Wk) float32, "cells" (Q, 2) the (row, col) query cell on the block's
        H x W grid, "grid" (H, W), "stride" (input pixels per cell), "key_stride".
    """
    block = find_block(model, block_name)
    height, width = model_input["height"], model_input["width"]
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(
                f"--point: ({x}, {y}) is outside the {width} x {height} image; valid: 0 <= x < {width}, "
                f"0 <= y < {height}"
            )

    captured = []
    handle = block.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    try:
        model([model_input])
    finally:
        handle.remove()  # nothing stays attached: normal inference records nothing
    if len(captured) != 1 or captured[0].shape[0] != 1:
        raise RuntimeError(f"expected one call of {block_name} on one image, got {len(captured)}")
    x_in = captured[0]
    weights, (hk, wk) = block.pairwise_weights(x_in)
    grid_h, grid_w = x_in.shape[-2:]

    # Padded input size, as the model's preprocessing makes it: cells are stride x stride pixels of it.
    padded_h = model.preprocess_image([model_input]).tensor.shape[-2]
    stride = padded_h / grid_h
    image_h, image_w = model_input["image"].shape[-2:]
    scale_y, scale_x = image_h / height, image_w / width
    cells = np.array(
        [
            (min(int(y * scale_y // stride), grid_h - 1), min(int(x * scale_x // stride), grid_w - 1))
            for x, y in points
        ]
    )
    rows = torch.as_tensor(cells[:, 0] * grid_w + cells[:, 1], device=weights.device)
    maps = weights[0, rows].reshape(len(points), hk, wk).float().cpu().numpy()
    key_stride = stride * (2 if block.sub_sample else 1)
    return dict(maps=maps, cells=cells, grid=(grid_h, grid_w), stride=stride, key_stride=key_stride)


def is_roi_block(block_name: str) -> bool:
    """Whether the block is in the keypoint head (it runs on RoI features, one detection per batch element)."""
    return block_name.startswith("roi_heads.keypoint_head.")


@torch.no_grad()
def roi_attention_maps(model, block_name: str, model_input: dict, roi: int, points=None, grid: int = 3):
    """
    :func:`attention_maps` for a block of the keypoint head: run ``model`` on one input, catch the block's
    input (R, C, H, W) (one map per detection) and the detections' boxes, and return the pairwise weights of
    RoI ``roi`` for the cells under ``points`` (original-image pixels inside its box; default: a ``grid`` x
    ``grid`` grid over the box).

    Returns:
        dict as :func:`attention_maps`, plus "box" (x0, y0, x1, y1) of the RoI in original-image pixels,
        "roi" and "points" (the query points used).
    """
    block = find_block(model, block_name)
    captured, boxes = [], []
    hooks = [
        block.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0])),
        # The keypoint head gets the detections (boxes in the model's input resolution) with the features.
        model.roi_heads.keypoint_head.register_forward_pre_hook(
            lambda module, inputs: boxes.append(inputs[1][0].pred_boxes.tensor.clone())
        ),
    ]
    try:
        model([model_input])
    finally:
        for handle in hooks:
            handle.remove()
    num_rois = captured[0].shape[0] if captured else 0
    if not 0 <= roi < num_rois:
        raise ValueError(
            f"--roi {roi}: the head's blocks ran on {num_rois} RoIs (detections) of this image; valid choices: "
            + (f"0..{num_rois - 1}" if num_rois else "none (lower MODEL.ROI_HEADS.SCORE_THRESH_TEST, or load --weights)")
        )
    height, width = model_input["height"], model_input["width"]
    image_h, image_w = model_input["image"].shape[-2:]
    x0, y0, x1, y1 = (boxes[0][roi] * torch.tensor([width / image_w, height / image_h] * 2)).tolist()
    if points is None:
        points = [(int(x0 + (x1 - x0) * (c + 0.5) / grid), int(y0 + (y1 - y0) * (r + 0.5) / grid))
                  for r in range(grid) for c in range(grid)]
    for x, y in points:
        if not (x0 <= x < x1 and y0 <= y < y1):
            raise ValueError(
                f"--point: ({x}, {y}) is outside RoI {roi}'s box; valid: {x0:.0f} <= x < {x1:.0f}, "
                f"{y0:.0f} <= y < {y1:.0f} (a head block sees only its RoI)"
            )
    x_in = captured[0][roi: roi + 1]
    weights, (hk, wk) = block.pairwise_weights(x_in)
    grid_h, grid_w = x_in.shape[-2:]
    # RoIAlign samples the box on a grid_h x grid_w grid: cell (i, j) covers 1/grid_h of its height, ...
    cells = np.array(
        [(min(int((y - y0) / (y1 - y0) * grid_h), grid_h - 1), min(int((x - x0) / (x1 - x0) * grid_w), grid_w - 1))
         for x, y in points]
    )
    rows = torch.as_tensor(cells[:, 0] * grid_w + cells[:, 1], device=weights.device)
    maps = weights[0, rows].reshape(len(points), hk, wk).float().cpu().numpy()
    return dict(maps=maps, cells=cells, grid=(grid_h, grid_w), box=(x0, y0, x1, y1), roi=roi, points=points)


def roi_map_to_image(attention: np.ndarray, box, original_hw) -> np.ndarray:
    """One (Hk, Wk) map of a RoI, as (H, W) over the original image: stretched over the box, 0 elsewhere."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    height, width = original_hw
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)
    full = np.zeros((height, width), dtype=np.float32)
    t = torch.from_numpy(attention)[None, None]
    full[y0:y1, x0:x1] = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="nearest")[0, 0].numpy()
    return full


def map_to_image(attention: np.ndarray, key_stride: float, resized_hw, original_hw) -> np.ndarray:
    """One (Hk, Wk) map, as (H, W) over the original image: each key covers key_stride^2 input pixels."""
    hk, wk = attention.shape
    t = torch.from_numpy(attention)[None, None]
    t = F.interpolate(t, size=(round(hk * key_stride), round(wk * key_stride)), mode="nearest")
    t = t[..., : resized_hw[0], : resized_hw[1]]  # drop the padding
    t = F.interpolate(t, size=tuple(original_hw), mode="bilinear", align_corners=False)
    return t[0, 0].numpy()


def overlay(image_rgb: np.ndarray, attention: np.ndarray, point: Tuple[int, int]) -> Image.Image:
    """The image, in grey, with the map (own min to max, colour-mapped) blended over it and the query marked."""
    from matplotlib import colormaps

    lo, hi = float(attention.min()), float(attention.max())
    normalised = (attention - lo) / (hi - lo) if hi > lo else np.zeros_like(attention)
    heat = colormaps[COLORMAP](normalised)[..., :3] * 255
    # Over the image in grey, so that the map's colours are not mixed with the image's.
    grey = image_rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    blended = (1 - OVERLAY_ALPHA) * grey[..., None] + OVERLAY_ALPHA * heat
    result = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(result)
    x, y = point
    r = max(3, min(result.size) // 40)
    for colour, width in (("black", 4), ("white", 2)):
        draw.line([(x - r, y), (x + r, y)], fill=colour, width=width)
        draw.line([(x, y - r), (x, y + r)], fill=colour, width=width)
    return result


def summary_sheet(image_rgb, overlays, maps, points, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(image_rgb.astype(np.uint8), "input")] + [
        (np.asarray(o), f"query ({x}, {y}), weights {m.min():.2g}..{m.max():.2g}")
        for o, m, (x, y) in zip(overlays, maps, points)
    ]
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, label) in zip(axes.flat, panels):
        ax.imshow(picture)
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def has_cues(dataset_name: str) -> bool:
    """Whether the dataset's COCO json gives every image a "cue" box (the context-cue dataset does)."""
    json_file = getattr(MetadataCatalog.get(dataset_name), "json_file", None)
    if not json_file or not os.path.isfile(json_file):
        return False
    with open(json_file) as f:
        images = json.load(f)["images"]
    return bool(images) and all("cue" in image for image in images)


def _object_points(bbox) -> List[Tuple[int, int]]:
    """A 3 x 3 sample of a box's interior (x, y, w, h): its centre and the points at 1/4 and 3/4 of it."""
    x, y, w, h = bbox
    return [(int(x + fx * w), int(y + fy * h)) for fy in (0.25, 0.5, 0.75) for fx in (0.25, 0.5, 0.75)]


@torch.no_grad()
def cue_attention_share(cfg, weights: str, dataset_name: str, block_name: str = "", max_images: int = 0) -> dict:
    """
    How much of its attention a non-local block's object queries put on the cue, against the cue's
    share of the key positions, over a dataset whose COCO json gives each image a "cue" box.

    Queries: the block's feature cells under a 3 x 3 sample of each annotated object's box (each cell
    once per object). Cue keys: the key cells (after subsampling) that overlap the cue's box. For each
    query, its share is the sum of its weights on the cue keys over the sum of all its weights (for the
    softmax modes, the sum itself), and its uniform share is the number of cue keys over the number of
    keys: what a query that attends to every key alike would put there.

    Returns: {"share", "uniform_share"} averaged over all queries of all images, "ratio" (their
    quotient: 1 for attention that ignores the cue), "queries", "images", "block".
    """
    model = build_model(cfg)
    SafeCheckpointer(model).load(weights)
    model.eval()
    blocks = nonlocal_blocks(model)
    block_name = block_name or next(iter(blocks), "")
    with open(MetadataCatalog.get(dataset_name).json_file) as f:
        cues = {image["id"]: image["cue"]["bbox"] for image in json.load(f)["images"]}
    records = DatasetCatalog.get(dataset_name)
    records = records[:max_images] if max_images else records
    mapper = inference_mapper(cfg)
    shares, uniforms = [], []
    for record in records:
        model_input = mapper({k: record[k] for k in ("file_name", "height", "width", "image_id")})
        points = [p for ann in record["annotations"] for p in _object_points(ann["bbox"])]
        result = attention_maps(model, block_name, model_input, points)
        # Each object's distinct cells (cells[i] belongs to points[i]; 9 points per object).
        cells = result["cells"].reshape(-1, 9, 2)
        rows = [k * 9 + i for k, obj in enumerate(cells) for i in sorted({tuple(c): i for i, c in enumerate(obj)}.values())]
        maps = result["maps"][rows]
        # The cue box in the resized image's pixels; key (r, c) covers [c * ks, (c + 1) * ks) x [r * ks, ...).
        scale_y = model_input["image"].shape[-2] / record["height"]
        scale_x = model_input["image"].shape[-1] / record["width"]
        x, y, w, h = cues[record["image_id"]]
        hk, wk = maps.shape[-2:]
        ks = result["key_stride"]
        key_x0, key_y0 = np.arange(wk) * ks, np.arange(hk) * ks
        over_x = (key_x0 < (x + w) * scale_x) & (key_x0 + ks > x * scale_x)
        over_y = (key_y0 < (y + h) * scale_y) & (key_y0 + ks > y * scale_y)
        cue_keys = over_y[:, None] & over_x[None, :]
        shares += list(maps[:, cue_keys].sum(axis=1) / maps.reshape(len(maps), -1).sum(axis=1))
        uniforms += [cue_keys.sum() / cue_keys.size] * len(maps)
    share, uniform = float(np.mean(shares)), float(np.mean(uniforms))
    return dict(share=share, uniform_share=uniform, ratio=share / uniform, queries=len(shares), images=len(records), block=block_name)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a .yaml or LazyConfig .py config")
    parser.add_argument(
        "--weights", default="", help="checkpoint to load (e.g. model_final.pth); default: none, random init"
    )
    parser.add_argument("--image", default="", help="image file; default: the first image of nl_shapes_val")
    parser.add_argument("--block", default="", help="qualified name of the block; default: the first one")
    parser.add_argument(
        "--point", dest="points", action="append", type=parse_point, default=None, metavar="X,Y",
        help="a query point in image pixels (repeat for more); default: an N x N grid (--grid)",
    )
    parser.add_argument("--grid", type=int, default=3, help="N of the default N x N grid of queries")
    parser.add_argument("--roi", type=int, default=0,
                        help="for a block of the keypoint head: which detection's RoI (0 = the highest score)")
    parser.add_argument("--output", default="output/attention", help="directory for the PNGs and attention.npz")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, default=[],
        help="config overrides: KEY VALUE pairs (YAML) or key=value (LazyConfig)",
    )
    return parser


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    setup_logger(name="nl_detectron")
    if args.grid < 1:
        raise ValueError(f"--grid {args.grid}: must be a positive integer")
    cfg = load_config(args.config_file, args.opts)
    model = build_model(cfg)
    if args.weights:
        SafeCheckpointer(model).load(args.weights)
    else:
        logger.warning("No --weights: the model has random weights (and its blocks start as identities).")
    model.eval()
    blocks = nonlocal_blocks(model)
    block_name = args.block or next(iter(blocks), "")

    image_path = args.image or default_image()
    image_rgb = read_image(image_path, format="RGB")
    height, width = image_rgb.shape[:2]
    model_input = inference_mapper(cfg)({"file_name": image_path, "height": height, "width": width, "image_id": 0})

    roi_block = is_roi_block(block_name)
    if roi_block:
        result = roi_attention_maps(model, block_name, model_input, args.roi, args.points, args.grid)
        points = result["points"]
    else:
        points = args.points or grid_points(width, height, args.grid)
        result = attention_maps(model, block_name, model_input, points)
    resized_hw = model_input["image"].shape[-2:]
    os.makedirs(args.output, exist_ok=True)
    overlays, written = [], []
    for k, (attention, point) in enumerate(zip(result["maps"], points)):
        if roi_block:
            full = roi_map_to_image(attention, result["box"], (height, width))
        else:
            full = map_to_image(attention, result["key_stride"], resized_hw, (height, width))
        picture = overlay(image_rgb.astype(np.float32), full, point)
        path = os.path.join(args.output, f"query{k:02d}_x{point[0]}_y{point[1]}.png")
        picture.save(path)
        overlays.append(picture)
        written.append(path)
    block = blocks[block_name]
    summary = os.path.join(args.output, "summary.png")
    summary_sheet(
        image_rgb, overlays, result["maps"], points,
        f"{block_name} ({block.mode}) of {os.path.basename(args.config_file)}"
        + (f", RoI {args.roi} box ({', '.join(f'{v:.0f}' for v in result['box'])})" if roi_block else ""),
        summary,
    )
    np.savez(
        os.path.join(args.output, "attention.npz"),
        maps=result["maps"], points=np.array(points), cells=result["cells"], grid=np.array(result["grid"]),
        block=block_name, mode=block.mode, image=image_path,
        **({"box": np.array(result["box"]), "roi": args.roi} if roi_block
           else {"stride": result["stride"], "key_stride": result["key_stride"]}),
    )
    logger.info(f"Wrote {len(written)} query maps, {summary} and attention.npz to {args.output}")
    return dict(queries=written, summary=summary, npz=os.path.join(args.output, "attention.npz"))


if __name__ == "__main__":
    main(sys.argv[1:])
