"""Two CPU training runs of the tiny config with the same seed give identical losses."""
import json
import os
import subprocess
import sys

import pytest

from tiny_training import REPO, SUBPROCESS_ENV, SUBPROCESS_TIMEOUT

pytestmark = pytest.mark.slow

ITERATIONS = 5

# One training run in its own process, as tools/train_net.py does it (setup seeds the RNGs from
# cfg.SEED, then Trainer, resume_or_load, train); prints every loss term of every iteration.
TRAIN_AND_PRINT_LOSSES = r"""
import json, sys
sys.path.insert(0, "tests")
from tiny_training import tiny_cfg
from nl_detectron.engine import Trainer

output_dir, seed, iterations = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = tiny_cfg(output_dir, "SEED", seed, "SOLVER.MAX_ITER", iterations, "SOLVER.CHECKPOINT_PERIOD", 1000)
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
losses = {
    name: [value for value, _ in history.values()]
    for name, history in trainer.storage.histories().items() if name.startswith("loss_")
}
print("LOSSES " + json.dumps(losses))
"""


def start_run(tmp_path, name, seed):
    log = open(tmp_path / f"{name}.log", "w")
    command = [sys.executable, "-c", TRAIN_AND_PRINT_LOSSES, str(tmp_path / name), str(seed), str(ITERATIONS)]
    process = subprocess.Popen(command, cwd=REPO, env=SUBPROCESS_ENV, stdout=log, stderr=subprocess.STDOUT)
    return process, log


def losses_of(process, log):
    process.wait(timeout=SUBPROCESS_TIMEOUT)
    log.close()
    with open(log.name) as f:
        text = f.read()
    assert process.returncode == 0, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("LOSSES ")]
    return json.loads(line[len("LOSSES "):])


def test_same_seed_same_losses(tmp_path):
    runs = {
        "first": start_run(tmp_path, "first", seed=7),
        "again": start_run(tmp_path, "again", seed=7),
        "other seed": start_run(tmp_path, "other", seed=8),
    }
    losses = {name: losses_of(*run) for name, run in runs.items()}

    first = losses["first"]
    assert sorted(first) == ["loss_box_reg", "loss_cls", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"]
    assert all(len(values) == ITERATIONS for values in first.values())
    assert losses["again"] == first  # exactly, every term of every iteration
    # The seed is what makes them agree: another seed draws other images and weights.
    assert losses["other seed"]["loss_cls"][0] != first["loss_cls"][0]
    assert os.path.exists(tmp_path / "first" / "model_final.pth")
