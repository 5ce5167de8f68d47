"""
The built-in keypoint dataset: images of houses (a rectangular body under a triangular roof), each with
5 keypoints, its corners, in COCO keypoint format.

It lets Keypoint R-CNN be trained and COCO-evaluated (keypoint and box AP) end to end where COCO cannot
be downloaded. Like the shapes dataset (nl_detectron/data/shapes.py), images are generated
deterministically from a seed, written once to a cache directory (images plus
``keypoints_<split>.json``) and registered as ``nl_houses_train`` and ``nl_houses_val``.

The keypoints have a left and a right, as a person's do: ``left_eave``/``left_base`` are the corners on
the house's own left, which is the image's left for an upright house (houses are tilted by at most 25
degrees); a horizontal flip swaps them (``keypoint_flip_map``). The roof's height and the apex's offset
vary independently of the body, so the eaves are not where the box alone would put them.
"""
import math

import numpy as np
from PIL import ImageDraw

from detectron2.data import MetadataCatalog

from .shapes import cache_dir, ensure_generated, noisy_background, place_apart, register_generated, write_coco_split

__all__ = [
    "HOUSE_KEYPOINT_NAMES", "HOUSE_KEYPOINT_FLIP_MAP", "HOUSE_KEYPOINT_OKS_SIGMAS", "HOUSES_SPLITS",
    "houses_root", "generate_houses", "ensure_houses", "register_houses",
]

HOUSE_KEYPOINT_NAMES = ("apex", "left_eave", "right_eave", "left_base", "right_base")
HOUSE_KEYPOINT_FLIP_MAP = (("left_eave", "right_eave"), ("left_base", "right_base"))
# COCO's sigmas measure how far human annotators disagree on a keypoint (0.025 for eyes to 0.107 for
# hips). These keypoints are exact, so the sigmas only set how much error OKS tolerates: one value for
# every corner, between COCO's face and limb keypoints (a chosen value, not a measured one).
HOUSE_KEYPOINT_OKS_SIGMAS = (0.05,) * len(HOUSE_KEYPOINT_NAMES)
# The outline, for detectron2's Visualizer: (keypoint, keypoint, RGB colour).
_CONNECTIONS = (
    ("apex", "left_eave", (255, 128, 0)), ("apex", "right_eave", (0, 128, 255)),
    ("left_eave", "left_base", (255, 128, 0)), ("right_eave", "right_base", (0, 128, 255)),
    ("left_base", "right_base", (255, 255, 255)), ("left_eave", "right_eave", (255, 255, 255)),
)
# name -> (split, number of images, seed). Changing the generator means bumping _VERSION.
HOUSES_SPLITS = {"nl_houses_train": ("train", 1000, 10), "nl_houses_val": ("val", 100, 11)}
IMAGE_SIZE = 256
MAX_TILT_DEGREES = 25
_VERSION = 1


def houses_root() -> str:
    """The cache directory: ``$NL_DETECTRON_CACHE/houses-v1`` (default ``~/.cache/nl_detectron``)."""
    return cache_dir("houses", _VERSION)


def _house_corners(rng: np.random.RandomState, cx: float, cy: float, r: float):
    """The 5 keypoints (x, y), in HOUSE_KEYPOINT_NAMES order, of a house within radius r of (cx, cy)."""
    # Every corner lies within r of the centre: |x| <= 0.6 r, |y| <= 0.8 r.
    width = rng.uniform(0.9, 1.2) * r
    body = rng.uniform(0.6, 0.9) * r
    roof = rng.uniform(0.3, 0.7) * r
    apex_offset = rng.uniform(-0.3, 0.3) * width
    # Local frame: x to the house's right, y down; the body centred on (0, roof / 2).
    top, bottom = -body / 2 + roof / 2, body / 2 + roof / 2
    local = [(apex_offset, top - roof), (-width / 2, top), (width / 2, top), (-width / 2, bottom), (width / 2, bottom)]
    tilt = math.radians(rng.uniform(-MAX_TILT_DEGREES, MAX_TILT_DEGREES))
    c, s = math.cos(tilt), math.sin(tilt)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in local]


def _draw_image(rng: np.random.RandomState, size: int):
    """One image (PIL RGB) and its annotations; houses do not overlap, so every keypoint is visible."""
    image, background = noisy_background(rng, size)
    draw = ImageDraw.Draw(image)
    annotations = []
    for cx, cy, r in place_apart(rng, size, max_count=3, radius=(0.1, 0.22)):
        apex, left_eave, right_eave, left_base, right_base = corners = _house_corners(rng, cx, cy, r)
        # Body and roof in two colours far from the background, so that the eaves show.
        body_colour, roof_colour = ((background + rng.randint(80, 176, size=3)) % 256 for _ in range(2))
        draw.polygon([left_eave, right_eave, right_base, left_base], fill=tuple(int(v) for v in body_colour))
        draw.polygon([left_eave, apex, right_eave], fill=tuple(int(v) for v in roof_colour))
        outline = [left_base, right_base, right_eave, apex, left_eave]
        xs, ys = [p[0] for p in outline], [p[1] for p in outline]
        area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
        annotations.append(
            {
                "category_id": 1,
                "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                "segmentation": [[v for p in outline for v in p]],
                "area": area,
                "iscrowd": 0,
                # COCO keypoints are pixel indices (detectron2 adds 0.5 when it loads them and takes it
                # off again when it writes predictions): the corner's continuous position minus 0.5.
                "keypoints": [v for x, y in corners for v in (x - 0.5, y - 0.5, 2)],
                "num_keypoints": len(corners),
            }
        )
    return image, annotations


def generate_houses(root: str, split: str, num_images: int, seed: int, size: int = IMAGE_SIZE) -> None:
    """Write ``root/<split>/*.png`` and ``root/annotations/keypoints_<split>.json`` (COCO keypoint format)."""
    index = {name: i + 1 for i, name in enumerate(HOUSE_KEYPOINT_NAMES)}  # COCO's skeleton is 1-based
    category = {
        "id": 1, "name": "house", "supercategory": "house", "keypoints": list(HOUSE_KEYPOINT_NAMES),
        "skeleton": [[index[a], index[b]] for a, b, _ in _CONNECTIONS],
    }
    write_coco_split(
        root, split, f"keypoints_{split}.json", num_images, seed, size, _draw_image, categories=[category],
        description=f"nl_detectron built-in houses, split {split}, seed {seed}",
    )


def ensure_houses(name: str) -> None:
    """Generate split ``name`` where its metadata points, unless it is there; safe when processes race."""
    split, num_images, seed = HOUSES_SPLITS[name]
    ensure_generated(MetadataCatalog.get(name), lambda root: generate_houses(root, split, num_images, seed))


def register_houses() -> None:
    """Register ``nl_houses_train`` and ``nl_houses_val`` (idempotent). Files are generated on first use."""
    register_generated(
        HOUSES_SPLITS, houses_root(), "keypoints_{split}.json", ensure_houses,
        thing_classes=["house"],
        keypoint_names=list(HOUSE_KEYPOINT_NAMES),
        keypoint_flip_map=[list(pair) for pair in HOUSE_KEYPOINT_FLIP_MAP],
        keypoint_connection_rules=list(_CONNECTIONS),
        keypoint_oks_sigmas=list(HOUSE_KEYPOINT_OKS_SIGMAS),
    )
