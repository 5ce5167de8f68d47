"""
The built-in dataset: images of squares, circles and triangles with instance masks, in COCO format.

It lets Mask R-CNN be trained and COCO-evaluated end to end where COCO cannot be downloaded. The images
are generated deterministically from a seed, written once to a cache directory (images plus
``instances_<split>.json``), and registered in detectron2's DatasetCatalog/MetadataCatalog as
``nl_shapes_train`` and ``nl_shapes_val``, so training and evaluation take the same path as on COCO.
"""
import json
import math
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "SHAPES_CLASSES", "SHAPES_SPLITS", "shapes_root", "generate_shapes", "ensure_shapes", "register_shapes",
    "noisy_background", "place_apart", "write_coco_split", "ensure_generated", "register_generated",
]

SHAPES_CLASSES = ["square", "circle", "triangle"]
# name -> (number of images, seed). Changing the generator means bumping _VERSION.
SHAPES_SPLITS = {"nl_shapes_train": ("train", 1000, 0), "nl_shapes_val": ("val", 100, 1)}
IMAGE_SIZE = 256
_VERSION = 1


def cache_dir(dataset: str, version: int) -> str:
    """A generated dataset's directory: ``$NL_DETECTRON_CACHE/<dataset>-v<version>`` (default ``~/.cache/nl_detectron``)."""
    cache = os.environ.get("NL_DETECTRON_CACHE", os.path.join("~", ".cache", "nl_detectron"))
    return os.path.join(os.path.expanduser(cache), f"{dataset}-v{version}")


def shapes_root() -> str:
    """The cache directory: ``$NL_DETECTRON_CACHE/shapes-v1`` (default ``~/.cache/nl_detectron``)."""
    return cache_dir("shapes", _VERSION)


def _polygon(kind, cx, cy, r, angle):
    """Vertices (x, y) of a shape of circumradius r centred at (cx, cy)."""
    n = {"square": 4, "triangle": 3, "circle": 32}[kind]
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def noisy_background(rng: np.random.RandomState, size: int):
    """A size x size RGB image of one random colour with uniform noise, and that colour (3 ints)."""
    background = rng.randint(0, 256, size=3)
    noise = rng.randint(-20, 21, size=(size, size, 3))
    return Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8)), background


def place_apart(rng: np.random.RandomState, size: int, max_count: int, radius: tuple):
    """
    Yield (cx, cy, r) of 1..max_count discs in a size x size image (their number drawn first), each of
    radius ``radius`` (a range, as fractions of size), inside the image and apart from the others; a disc
    that does not fit in 20 tries is skipped. The caller may draw from ``rng`` between the discs.
    """
    placed = []
    for _ in range(rng.randint(1, max_count + 1)):
        for _attempt in range(20):
            r = rng.uniform(size * radius[0], size * radius[1])
            cx, cy = rng.uniform(r, size - r, size=2)
            if all(math.hypot(cx - x, cy - y) > r + s + 2 for x, y, s in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        yield cx, cy, r


def polygon_annotation(vertices, category_id: int) -> dict:
    """The COCO annotation of one polygon object: its box, its polygon as the mask, and its exact area."""
    xs, ys = [v[0] for v in vertices], [v[1] for v in vertices]
    area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
    return {
        "category_id": category_id,
        "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
        "segmentation": [[c for v in vertices for c in v]],
        "area": area,
        "iscrowd": 0,
    }


def _draw_image(rng: np.random.RandomState, size: int):
    """One image (H, W, 3 uint8) and its annotations; shapes do not overlap, so polygons are exact masks."""
    image, background = noisy_background(rng, size)
    draw = ImageDraw.Draw(image)
    annotations = []
    for cx, cy, r in place_apart(rng, size, max_count=4, radius=(0.06, 0.2)):
        category = rng.randint(len(SHAPES_CLASSES))
        vertices = _polygon(SHAPES_CLASSES[category], cx, cy, r, rng.uniform(0, 2 * math.pi))
        # A colour far from the background, so that every shape is visible.
        color = (background + rng.randint(80, 176, size=3)) % 256
        draw.polygon(vertices, fill=tuple(int(c) for c in color))
        annotations.append(polygon_annotation(vertices, category + 1))
    return image, annotations


def generate_shapes(root: str, split: str, num_images: int, seed: int, size: int = IMAGE_SIZE) -> None:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json`` (COCO format)."""
    write_coco_split(
        root, split, f"instances_{split}.json", num_images, seed, size, _draw_image,
        categories=[{"id": i + 1, "name": n} for i, n in enumerate(SHAPES_CLASSES)],
        description=f"nl_detectron built-in shapes, split {split}, seed {seed}",
    )


def write_coco_split(root, split, json_name, num_images, seed, size, draw_image, *, categories, description):
    """
    Write ``num_images`` images ``draw_image(rng, size) -> (PIL image, [annotation])`` (one RandomState
    seeded with ``seed``, drawn in order; ``size`` is passed through, and the json records each image's own
    width and height) to ``root/<split>/`` and their COCO json to
    ``root/annotations/<json_name>``. ``draw_image`` may return a third item, a dict of extra fields for
    the image's entry in the json (the context-cue dataset's ``"cue"``).
    """
    rng = np.random.RandomState(seed)
    images, annotations = [], []
    os.makedirs(os.path.join(root, split), exist_ok=True)
    for image_id in range(1, num_images + 1):
        image, anns, *image_fields = draw_image(rng, size)
        file_name = f"{image_id:06d}.png"
        image.save(os.path.join(root, split, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": image.height, "width": image.width,
                       **dict(*image_fields)})
        for ann in anns:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_id))
    coco = {"info": {"description": description}, "images": images, "annotations": annotations, "categories": categories}
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", json_name), "w") as f:
        json.dump(coco, f)


def ensure_shapes(name: str) -> None:
    """Generate split ``name`` where its metadata points, unless it is there; safe when processes race."""
    split, num_images, seed = SHAPES_SPLITS[name]
    ensure_generated(MetadataCatalog.get(name), lambda root: generate_shapes(root, split, num_images, seed))


def ensure_generated(meta, generate) -> None:
    """
    Unless ``meta.image_root`` exists, call ``generate(root)``, which must write ``root/<split>/`` (the
    images; ``<split>`` the name of ``meta.image_root``) and ``root/annotations/<name of meta.json_file>``,
    and move both where ``meta`` points; safe when processes race.
    """
    if os.path.isdir(meta.image_root):  # the image folder is moved into place last
        return
    root = os.path.dirname(meta.image_root)
    split = os.path.basename(meta.image_root)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    # Build in a private temp dir, then move the finished split into place: a killed or concurrent
    # generation never leaves a half-written split where readers look.
    tmp = tempfile.mkdtemp(prefix=f".{split}-", dir=root)
    try:
        generate(tmp)
        os.replace(os.path.join(tmp, "annotations", os.path.basename(meta.json_file)), meta.json_file)
        try:
            os.rename(os.path.join(tmp, split), meta.image_root)
        except OSError:  # another process finished first, with the same content
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(name: str, ensure):
    ensure(name)
    meta = MetadataCatalog.get(name)
    return load_coco_json(meta.json_file, meta.image_root, name)


def register_shapes() -> None:
    """Register ``nl_shapes_train`` and ``nl_shapes_val`` (idempotent). Files are generated on first use."""
    register_generated(SHAPES_SPLITS, shapes_root(), "instances_{split}.json", ensure_shapes,
                       thing_classes=list(SHAPES_CLASSES))


def register_generated(splits, root, json_name, ensure, **metadata) -> None:
    """
    Register each dataset ``name`` of ``splits`` ({name: (split, ...)}) as a COCO-format dataset at
    ``root/<split>/`` and ``root/annotations/<json_name with {split}>``, generated on first use by
    ``ensure(name)``, with ``metadata`` (idempotent).
    """
    for name, (split, *_) in splits.items():
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: _load(name, ensure))
        MetadataCatalog.get(name).set(
            json_file=os.path.join(root, "annotations", json_name.format(split=split)),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
            **metadata,
        )
