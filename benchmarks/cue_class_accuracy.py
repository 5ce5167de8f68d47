"""
How often a trained model names an object's category right on a detection dataset, independent of
localisation: for each ground-truth object, the highest-scoring detection with IoU >= 0.5 (boxes); prints
how many objects were found and the share whose detection has the right class. On the context-cue data,
chance is 1/3 (docs/gain.md reads it this way).

    .venv/bin/python benchmarks/cue_class_accuracy.py VAL_JSON RUN_DIR [RUN_DIR ...]

RUN_DIR is a tools/train_net.py output directory (its COCOEvaluator wrote inference/instances_predictions.pth).
"""
import json
import sys

import pycocotools.mask as mask_util
import torch


def main(val_json, runs):
    with open(val_json) as f:
        gt = json.load(f)
    # The .pth holds contiguous category ids (0..K-1); the json's are its own, in sorted order.
    dataset_ids = sorted(c["id"] for c in gt["categories"])
    for run in runs:
        preds = torch.load(f"{run}/inference/instances_predictions.pth", weights_only=False)
        by_image = {p["image_id"]: p["instances"] for p in preds}
        found = right = 0
        for ann in gt["annotations"]:
            detections = by_image.get(ann["image_id"], [])
            # pycocotools' IoU of (x, y, w, h) boxes, as COCOeval computes it: detections x [this object].
            ious = mask_util.iou([d["bbox"] for d in detections], [ann["bbox"]], [0]) if detections else []
            matches = [d for d, overlap in zip(detections, ious) if overlap[0] >= 0.5]
            if matches:
                best = max(matches, key=lambda d: d["score"])
                found += 1
                right += dataset_ids[best["category_id"]] == ann["category_id"]
        share = right / found if found else float("nan")
        print(f"{run}: {len(gt['annotations'])} objects, {found} found (IoU >= 0.5), class right for {share:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
