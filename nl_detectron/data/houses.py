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
import json
import math
import os

import numpy as np
from PIL import ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import ensure_generated, noisy_background

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
    cache = os.environ.get("NL_DETECTRON_CACHE", os.path.join("~", ".cache", "nl_detectron"))
    return os.path.join(os.path.expanduser(cache), f"houses-v{_VERSION}")


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
    annotations, placed = [], []
    for _ in range(rng.randint(1, 4)):
        for _attempt in range(20):
            r = rng.uniform(size * 0.1, size * 0.22)
            cx, cy = rng.uniform(r, size - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + s + 2 for x, y, s in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
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
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for image_id in range(1, num_images + 1):
        image, anns = _draw_image(rng, size)
        file_name = f"{image_id:06d}.png"
        image.save(os.path.join(root, split, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for ann in anns:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_id))
    index = {name: i + 1 for i, name in enumerate(HOUSE_KEYPOINT_NAMES)}  # COCO's skeleton is 1-based
    coco = {
        "info": {"description": f"nl_detectron built-in houses, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {
                "id": 1, "name": "house", "supercategory": "house",
                "keypoints": list(HOUSE_KEYPOINT_NAMES),
                "skeleton": [[index[a], index[b]] for a, b, _ in _CONNECTIONS],
            }
        ],
    }
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", f"keypoints_{split}.json"), "w") as f:
        json.dump(coco, f)


def ensure_houses(name: str) -> None:
    """Generate split ``name`` where its metadata points, unless it is there; safe when processes race."""
    split, num_images, seed = HOUSES_SPLITS[name]
    ensure_generated(MetadataCatalog.get(name), lambda root: generate_houses(root, split, num_images, seed))


def _load(name: str):
    ensure_houses(name)
    meta = MetadataCatalog.get(name)
    return load_coco_json(meta.json_file, meta.image_root, name)


def register_houses() -> None:
    """Register ``nl_houses_train`` and ``nl_houses_val`` (idempotent). Files are generated on first use."""
    root = houses_root()
    for name, (split, _, _) in HOUSES_SPLITS.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: _load(name))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "annotations", f"keypoints_{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            thing_classes=["house"],
            keypoint_names=list(HOUSE_KEYPOINT_NAMES),
            keypoint_flip_map=[list(pair) for pair in HOUSE_KEYPOINT_FLIP_MAP],
            keypoint_connection_rules=list(_CONNECTIONS),
            keypoint_oks_sigmas=list(HOUSE_KEYPOINT_OKS_SIGMAS),
        )
