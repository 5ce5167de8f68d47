"""
``tools/train_net.py --num-gpus 2`` on a machine without GPUs: two CPU processes (gloo) train the
non-local Mask R-CNN, stay identical, and the non-local block gets gradients on both.
"""
import json
import os
import subprocess

import pytest
import torch

from tiny_training import REPO, SUBPROCESS_TIMEOUT, train_net_command

pytestmark = pytest.mark.slow

ITERATIONS = 4

# Loaded by every Python process of the run (the launcher and both workers, which torch spawns afresh)
# through PYTHONPATH: adds a hook to the project's Trainer that records what the test checks, per rank.
PROBE = r'''
import os

if os.environ.get("NL_TEST_PROBE_DIR"):
    import torch
    import torch.distributed as dist
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    from nl_detectron.engine import Trainer

    class Probe(HookBase):
        def before_train(self):
            self.model = getattr(self.trainer.model, "module", self.trainer.model)
            self.image_ids = []  # of each training step's batch

            def record_batch(module, args):
                if module.training:
                    self.image_ids.append([x["image_id"] for x in args[0]])

            self.model.register_forward_pre_hook(record_batch)
            self.nonlocal_grad_max = {}

        def after_step(self):  # the gradients of this step are still there after optimizer.step()
            for name, p in self.model.named_parameters():
                if ".nonlocal" in name:
                    g = 0.0 if p.grad is None else p.grad.abs().max().item()
                    self.nonlocal_grad_max[name] = max(self.nonlocal_grad_max.get(name, 0.0), g)

        def after_train(self):
            torch.save(
                {
                    "world_size": comm.get_world_size(),
                    "backend": str(dist.get_backend()),
                    "wrapper": type(self.trainer.model).__name__,
                    "threads": torch.get_num_threads(),
                    "image_ids": self.image_ids,
                    "nonlocal_grad_max": self.nonlocal_grad_max,
                    "params": {n: p.detach().clone() for n, p in self.model.named_parameters()},
                    "grads": {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None},
                },
                os.path.join(os.environ["NL_TEST_PROBE_DIR"], f"rank{comm.get_rank()}.pth"),
            )

    build_hooks = Trainer.build_hooks
    Trainer.build_hooks = lambda self: build_hooks(self) + [Probe()]
'''


def test_two_cpu_processes_train_in_sync(tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the trainer shares the cores
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["NL_TEST_PROBE_DIR"] = str(probe_dir)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even where there are GPUs

    out = tmp_path / "out"
    log = tmp_path / "train.log"
    with open(log, "w") as f:
        run = subprocess.run(
            train_net_command(
                out, "SOLVER.MAX_ITER", ITERATIONS, "DATASETS.TEST", "('nl_shapes_val',)",
                "TEST.DETECTIONS_PER_IMAGE", 10, num_gpus=2,
            ),
            cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=SUBPROCESS_TIMEOUT,
        )
    text = log.read_text()
    assert run.returncode == 0, text[-5000:]

    ranks = [torch.load(probe_dir / f"rank{r}.pth", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert (rank["world_size"], rank["backend"], rank["wrapper"]) == (2, "gloo", "DistributedDataParallel")
        assert rank["threads"] == max(1, torch.get_num_threads() // 2)
        assert len(rank["image_ids"]) == ITERATIONS
    # Each rank trained on its own images ...
    assert all(a != b for a, b in zip(ranks[0]["image_ids"], ranks[1]["image_ids"]))
    # ... and yet, through the all-reduced gradients, the ranks hold the same parameters, bit for bit.
    params0, params1 = ranks[0]["params"], ranks[1]["params"]
    assert params0.keys() == params1.keys()
    for name in params0:
        assert torch.equal(params0[name], params1[name]), name
    for name in ranks[0]["grads"]:
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name

    # The non-local block took part: every one of its parameters got a gradient on both ranks, and it
    # is no longer the identity it starts as.
    nonlocal_params = [n for n in params0 if ".nonlocal" in n]
    assert {n.split(".nonlocal")[0] for n in nonlocal_params} == {"backbone.bottom_up.res4"}
    assert len(nonlocal_params) >= 7  # theta, phi, g (weights and biases) and w_z
    for rank in ranks:
        assert sorted(rank["nonlocal_grad_max"]) == sorted(nonlocal_params)
        assert all(g > 0 for g in rank["nonlocal_grad_max"].values()), rank["nonlocal_grad_max"]
    w_z = [n for n in nonlocal_params if n.endswith("w_z.weight")][0]
    assert params0[w_z].abs().max() > 0

    # Rank 0 saved the synchronised weights; both ranks evaluated their share of the val split.
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == ITERATIONS - 1
    for name, value in params0.items():
        assert torch.equal(final["model"][name], value), name
    assert "copypaste: Task: segm" in text
    with open(out / "inference" / "coco_instances_results.json") as f:
        assert {d["image_id"] for d in json.load(f)} - set(range(1, 101)) == set()
