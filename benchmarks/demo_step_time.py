"""
Training-step time of the demo's recipe at 256 px (its config) and at 192 px (anchors scaled), untrained,
alternating in one process so that both see the same load. docs/performance.md reports its output.

    .venv/bin/python benchmarks/demo_step_time.py STEPS ROUNDS      # e.g. 3 6; threads: OMP_NUM_THREADS
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
SMALL = ["INPUT.MIN_SIZE_TRAIN", "(192,)", "INPUT.MAX_SIZE_TRAIN", "192", "MODEL.ANCHOR_GENERATOR.SIZES", "[[12],[24],[48],[96],[192]]"]
STEPS, ROUNDS = int(sys.argv[1]), int(sys.argv[2])
trainers = {}
for name, opts in (("256px", []), ("192px", SMALL)):
    cfg = load_config(CONFIG, opts + ["DATALOADER.NUM_WORKERS", "0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    trainers[name] = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model))
    trainers[name].iter = 0
    for _ in range(3):  # warm-up
        trainers[name].run_step()
times = {n: [] for n in trainers}
for r in range(ROUNDS):
    for name in (list(trainers) if r % 2 == 0 else list(trainers)[::-1]):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            trainers[name].run_step()
        times[name].append((time.perf_counter() - t0) / STEPS)
ratios = [a / b for a, b in zip(times["192px"], times["256px"])]
print("threads", torch.get_num_threads(), {n: [round(t, 3) for t in v] for n, v in times.items()})
print("ratio 192/256 per round", [round(x, 3) for x in ratios], "median", round(statistics.median(ratios), 3))
