"""
The context-cue dataset: grey shapes whose category is the colour of one small unannotated marker placed
far from all of them, in COCO format.

Every object of an image is a square, circle or triangle in a shade of grey; its category ("red", "green"
or "blue") is the colour of the image's one marker, a coloured square that is not annotated and whose
edges lie at least ``MIN_GAP`` pixels from every object's bounding box. Nothing on or around an object
tells its category: a detector has to carry the marker's colour across the image to the object, the
long-range dependency that a non-local block is meant to capture (docs/gain.md).

Generated deterministically from a seed like the shapes dataset (nl_detectron/data/shapes.py), cached,
and registered as ``nl_context_train`` and ``nl_context_val``. Each image entry of the COCO json also
holds its marker, ``"cue": {"bbox": [x, y, w, h], "category_id": c}``, for the attention measurements.
"""
import math

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import MetadataCatalog

from .shapes import (
    SHAPES_CLASSES, _polygon, cache_dir, ensure_generated, polygon_annotation, register_generated, write_coco_split,
)

__all__ = ["CONTEXT_CLASSES", "CONTEXT_SPLITS", "context_root", "generate_context", "ensure_context", "register_context"]

CONTEXT_CLASSES = ["red", "green", "blue"]
MARKER_COLOURS = [(230, 30, 30), (30, 210, 30), (40, 70, 240)]  # in CONTEXT_CLASSES order
# name -> (split, number of images, seed). Changing the generator or these numbers means bumping _VERSION.
CONTEXT_SPLITS = {"nl_context_train": ("train", 1000, 10), "nl_context_val": ("val", 100, 11)}
# A wide strip: the marker can sit far from the objects (MIN_GAP) at 1.2x the pixels of a 160 x 160 image.
# In a 160 x 160 image with a 24 px marker at least 40 px away, neither model had learned the cue after 800
# iterations (design seed 100, docs/gain.md).
IMAGE_WIDTH, IMAGE_HEIGHT = 320, 96
MARKER_SIZE = 32  # pixels; 25 px in a 256 px image was too small to be learned in 500 iterations (issue 10)
# Pixels between the marker's edges and every object's bounding box: three times the marker's size, three
# cells of res5 (stride 32), so that an object's own neighbourhood (the region a RoI's 7 x 7 pooled
# features and a few convolutions cover) holds nothing of it.
MIN_GAP = 100
MAX_OBJECTS = 3
RADIUS = (13, 26)  # objects' circumradius, pixels
_VERSION = 2


def context_root() -> str:
    """The cache directory: ``$NL_DETECTRON_CACHE/context-v2`` (default ``~/.cache/nl_detectron``)."""
    return cache_dir("context", _VERSION)


def box_gap(a, b) -> float:
    """Euclidean distance between two boxes (x0, y0, x1, y1); 0 where they touch or overlap."""
    dx = max(b[0] - a[2], a[0] - b[2], 0.0)
    dy = max(b[1] - a[3], a[1] - b[3], 0.0)
    return math.hypot(dx, dy)


def _draw_image(rng: np.random.RandomState, size: tuple):
    """One ``size`` = (width, height) image (PIL), its object annotations (at least one) and ``{"cue": ...}``."""
    width, height = size
    while True:
        mx = int(rng.randint(0, width - MARKER_SIZE + 1))  # whole pixels
        my = int(rng.randint(0, height - MARKER_SIZE + 1))
        marker = (mx, my, mx + MARKER_SIZE, my + MARKER_SIZE)
        objects = []
        for _ in range(rng.randint(1, MAX_OBJECTS + 1)):
            for _attempt in range(30):
                r = rng.uniform(*RADIUS)
                cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
                box = (cx - r, cy - r, cx + r, cy + r)  # the circumscribed square: a shape's bbox lies inside
                if box_gap(box, marker) >= MIN_GAP and all(box_gap(box, o[1]) > 2 for o in objects):
                    objects.append(((cx, cy, r), box))
                    break
        if objects:
            break
    category = rng.randint(len(CONTEXT_CLASSES))
    # Grey background and grey shapes: no colour anywhere but the marker's.
    background = rng.randint(0, 256)
    noise = rng.randint(-20, 21, size=(height, width, 1))
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8).repeat(3, axis=2))
    draw = ImageDraw.Draw(image)
    draw.rectangle([marker[0], marker[1], marker[2] - 1, marker[3] - 1], fill=MARKER_COLOURS[category])
    annotations = []
    for (cx, cy, r), _ in objects:
        kind = SHAPES_CLASSES[rng.randint(len(SHAPES_CLASSES))]
        vertices = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        grey = int((background + rng.randint(80, 176)) % 256)
        draw.polygon(vertices, fill=(grey, grey, grey))
        annotations.append(polygon_annotation(vertices, category + 1))
    cue = {"bbox": [marker[0], marker[1], MARKER_SIZE, MARKER_SIZE], "category_id": category + 1}
    return image, annotations, {"cue": cue}


def generate_context(root: str, split: str, num_images: int, seed: int,
                     size: tuple = (IMAGE_WIDTH, IMAGE_HEIGHT)) -> None:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json`` (COCO format, plus "cue")."""
    write_coco_split(
        root, split, f"instances_{split}.json", num_images, seed, size, _draw_image,
        categories=[{"id": i + 1, "name": n} for i, n in enumerate(CONTEXT_CLASSES)],
        description=f"nl_detectron context cue, split {split}, seed {seed}: grey shapes whose category "
        f"is the colour of a {MARKER_SIZE} px marker at least {MIN_GAP} px from them",
    )


def ensure_context(name: str) -> None:
    """Generate split ``name`` where its metadata points, unless it is there; safe when processes race."""
    split, num_images, seed = CONTEXT_SPLITS[name]
    ensure_generated(MetadataCatalog.get(name), lambda root: generate_context(root, split, num_images, seed))


def register_context() -> None:
    """Register ``nl_context_train`` and ``nl_context_val`` (idempotent). Files are generated on first use."""
    register_generated(CONTEXT_SPLITS, context_root(), "instances_{split}.json", ensure_context,
                       thing_classes=list(CONTEXT_CLASSES))
