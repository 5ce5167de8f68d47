"""
Training-step time of candidate recipes for the demo against its config, untrained, alternating in one
process so that all see the same load. docs/performance.md reports its output.

    .venv/bin/python benchmarks/demo_step_time.py STEPS ROUNDS [VARIANT ...]   # e.g. 3 6 192px; threads: OMP_NUM_THREADS

Each variant is a list of KEY VALUE overrides of configs/quick/mask_rcnn_nl_R18_shapes.yaml (VARIANTS
below); the ratio printed is the variant's step time over the config's, per round and their median.
"""
import statistics, sys, time
import torch
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
storage = EventStorage(0).__enter__()
from nl_detectron.config_files import load_config, build_model

CONFIG = "configs/quick/mask_rcnn_nl_R18_shapes.yaml"
_192 = ["INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "192",
        "MODEL.ANCHOR_GENERATOR.SIZES", "[[12],[24],[48],[96],[192]]"]
VARIANTS = {
    "config": [],
    "192px": _192,
    "mask64": ["MODEL.ROI_MASK_HEAD.CONV_DIM", "64"],
    "rois32": ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"],
    "rois48": ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "48"],
    "proposals150": ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "150"],
    "fpn96": ["MODEL.FPN.OUT_CHANNELS", "96"],
    "rois32-fpn96": ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.FPN.OUT_CHANNELS", "96"],
    "192px-mask64": _192 + ["MODEL.ROI_MASK_HEAD.CONV_DIM", "64"],
    # The recipe until 2026-12-01, whose Xeon time issue 12 measured: its ratio carries that time over.
    "old256": ["INPUT.MIN_SIZE_TRAIN", "(256,)", "INPUT.MAX_SIZE_TRAIN", "256",
               "MODEL.ANCHOR_GENERATOR.SIZES", "[[16],[32],[64],[128],[256]]",
               "MODEL.ROI_MASK_HEAD.CONV_DIM", "128"],
}
STEPS, ROUNDS = int(sys.argv[1]), int(sys.argv[2])
names = ["config"] + (sys.argv[3:] or ["192px"])
trainers = {}
for name in names:
    cfg = load_config(CONFIG, VARIANTS[name] + ["DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    trainers[name] = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model))
    trainers[name].iter = 0
    for _ in range(3):  # warm-up
        trainers[name].run_step()
times = {n: [] for n in trainers}
for r in range(ROUNDS):
    for name in (names if r % 2 == 0 else names[::-1]):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            trainers[name].run_step()
        times[name].append((time.perf_counter() - t0) / STEPS)
print("threads", torch.get_num_threads(), {n: [round(t, 3) for t in v] for n, v in times.items()})
for name in names[1:]:
    ratios = [a / b for a, b in zip(times[name], times["config"])]
    print(f"ratio {name}/config per round", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
