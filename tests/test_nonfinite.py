"""A NaN or infinite loss stops training with an error naming the iteration and the loss terms; the last good checkpoint stays intact."""
import glob
import hashlib
import os
import re

import pytest
import torch

from detectron2.engine import HookBase

from nl_detectron import nonlocal_blocks
from nl_detectron.engine import Trainer

from tiny_training import last_checkpoint, one_thread, tiny_cfg  # noqa: F401 (one_thread: autouse fixture)

LOSS_TERMS = ["loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"]
BAD_ITERATION = 3  # a checkpoint is written after iteration 1 before it (CHECKPOINT_PERIOD 2)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class AtIteration(HookBase):
    """Calls ``action(trainer)`` before the step of ``iteration``; notes the last checkpoint's bytes then."""

    def __init__(self, iteration, action):
        self.iteration, self.action = iteration, action

    def before_step(self):
        if self.trainer.iter == self.iteration:
            self.last_good = last_checkpoint(self.trainer.cfg.OUTPUT_DIR)
            self.last_good_sha256 = sha256(self.last_good)
            self.action(self.trainer)


def loss_times(factor, term):
    """Make loss ``term`` non-finite from now on, as a diverged loss would be."""

    def action(trainer):
        def hook(module, inputs, losses):
            return dict(losses, **{term: losses[term] * factor})

        trainer.model.register_forward_hook(hook)

    return action


def nan_in_the_nonlocal_block(trainer):
    """NaN weights in the non-local block: everything after it, proposals included, turns NaN."""
    (block,) = nonlocal_blocks(trainer.model).values()
    with torch.no_grad():
        block.w_z.weight.fill_(float("nan"))


# (how to break iteration 3, patterns the error message must contain)
CASES = {
    # detectron2's own check of the summed losses: names the iteration and lists every loss term
    # (numpy 2 prints the values as np.float64(nan)).
    "nan loss": (
        loss_times(float("nan"), "loss_mask"),
        ["iteration=3", r"'loss_mask': (np.float64\()?nan"] + LOSS_TERMS,
    ),
    "inf loss": (
        loss_times(float("inf"), "loss_rpn_loc"),
        ["iteration=3", r"'loss_rpn_loc': (np.float64\()?inf"] + LOSS_TERMS,
    ),
    # detectron2 stops at the NaN proposals, before any loss exists: the trainer adds the iteration.
    "nan activations": (nan_in_the_nonlocal_block, ["Inf/NaN", "diverged"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, case):
    action, fragments = CASES[case]
    cfg = tiny_cfg(tmp_path)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 2 and cfg.SOLVER.MAX_ITER > BAD_ITERATION + 1
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    saboteur = AtIteration(BAD_ITERATION, action)
    trainer.register_hooks([saboteur])

    with pytest.raises(FloatingPointError) as info:
        trainer.train()
    message = str(info.value)
    good = os.path.join(str(tmp_path), "model_0000001.pth")
    ours = [f"at iteration {BAD_ITERATION}", f"last complete checkpoint is {re.escape(good)}"]
    for pattern in fragments + ours:
        assert re.search(pattern, message), (pattern, message)

    # The last good checkpoint is still the one last_checkpoint names, byte for byte, and it is finite.
    assert saboteur.last_good == good
    assert last_checkpoint(cfg.OUTPUT_DIR) == good
    assert sha256(good) == saboteur.last_good_sha256
    checkpoint = torch.load(good, weights_only=True)
    assert checkpoint["iteration"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())
    assert [os.path.basename(p) for p in glob.glob(os.path.join(str(tmp_path), "*.pth"))] == ["model_0000001.pth"]
    assert glob.glob(os.path.join(str(tmp_path), ".*.tmp")) == []

    # Resuming starts right after it, from its weights.
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][name]), name

