"""
Where one training step of the demo's recipe (untrained, 3 warm-up steps, then 3 profiled) spends its CPU
time: torch.profiler's table by self CPU time. docs/performance.md reports its output.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_profile.py
"""
import torch
from torch.profiler import profile, ProfilerActivity
from detectron2.data import build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage
from nl_detectron.config_files import load_config, build_model
storage = EventStorage(0).__enter__()
cfg = load_config("configs/quick/mask_rcnn_nl_R18_shapes.yaml", ["DATALOADER.NUM_WORKERS", "0"])
torch.manual_seed(0)
model = build_model(cfg)
t = SimpleTrainer(model, build_detection_train_loader(cfg), build_optimizer(cfg, model)); t.iter = 0
for _ in range(3): t.run_step()
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(3): t.run_step()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
