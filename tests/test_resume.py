"""
A training run killed with SIGKILL (while training, or in the middle of writing a checkpoint) resumes with
``--resume`` from its last complete checkpoint and finishes; ``last_checkpoint`` never names a partial file.
"""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tiny_training import (
    REPO, SUBPROCESS_ENV, SUBPROCESS_TIMEOUT, TRAIN_NET, checkpoint_iteration, last_checkpoint, train_net_command,
)

pytestmark = pytest.mark.slow

# 20 iterations, a checkpoint after iterations 4, 9, 14 and 19, then model_final.
SCHEDULE = ("SOLVER.MAX_ITER", 20, "SOLVER.CHECKPOINT_PERIOD", 5)
MAX_ITER = 20

# Runs tools/train_net.py and stops for good in the middle of one save, telling the test by creating
# $NL_TEST_PAUSE_MARKER, so that the test can kill it there:
# - NL_TEST_PAUSE_AT=<checkpoint name>: after writing half of that checkpoint's bytes;
# - NL_TEST_PAUSE_AT=last_checkpoint:<checkpoint name>: when the new last_checkpoint naming that
#   checkpoint is written and about to be fsync'ed, before it replaces the old one.
PAUSING_TRAIN_NET = r"""
import io, os, runpy, sys, time
import torch

target = os.environ["NL_TEST_PAUSE_AT"]
marker = os.environ["NL_TEST_PAUSE_MARKER"]

def pause():
    open(marker, "w").close()
    time.sleep(3600)

def path_of(fd):
    return os.readlink(f"/proc/self/fd/{fd}")

if target.startswith("last_checkpoint:"):
    real_fsync, name = os.fsync, target.split(":", 1)[1]
    def fsync(fd):
        path = path_of(fd)
        if os.path.basename(path).startswith(".last_checkpoint.") and open(path).read() == name:
            pause()
        return real_fsync(fd)
    os.fsync = fsync
else:
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if hasattr(f, "fileno") and os.path.basename(path_of(f.fileno())).startswith(f".{target}."):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            pause()
        return real_save(obj, f, *args, **kwargs)
    torch.save = save

sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def start(command, log, env=SUBPROCESS_ENV):
    with open(log, "w") as f:
        return subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)


def wait_until(condition, process, log, what):
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"training exited (rc {process.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}:\n{tail(log)}")
        time.sleep(0.02)


def kill(process):
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL


def tail(log, lines=40):
    with open(log) as f:
        return "".join(f.readlines()[-lines:])


def tag(output_dir):
    path = os.path.join(output_dir, "last_checkpoint")
    return open(path).read() if os.path.exists(path) else None


def temp_files(output_dir):
    return sorted(glob.glob(os.path.join(output_dir, ".*.tmp")))


def assert_consistent(output_dir):
    """last_checkpoint names a complete checkpoint; every .pth file is complete. Returns its iteration."""
    named = last_checkpoint(output_dir)
    iteration = checkpoint_iteration(named)  # loads: complete
    final = iteration == MAX_ITER - 1 and os.path.basename(named) == "model_final.pth"
    assert final or os.path.basename(named) == f"model_{iteration:07d}.pth"
    for path in glob.glob(os.path.join(output_dir, "*.pth")):
        checkpoint_iteration(path)
        torch.load(path)  # torch's own defaults (weights_only since torch 2.6) read them too
    return iteration


def resume_and_finish(output_dir, tmp_path, expected_start):
    log = tmp_path / "resume.log"
    with open(log, "w") as f:
        run = subprocess.run(
            train_net_command(output_dir, *SCHEDULE, resume=True), cwd=REPO, env=SUBPROCESS_ENV, stdout=f,
            stderr=subprocess.STDOUT, timeout=SUBPROCESS_TIMEOUT,
        )
    assert run.returncode == 0, tail(log)
    text = log.read_text()
    assert f"Starting training from iteration {expected_start}\n" in text, tail(log)
    final = os.path.join(output_dir, "model_final.pth")
    assert checkpoint_iteration(final) == MAX_ITER - 1
    assert tag(output_dir) == "model_final.pth"
    assert_consistent(output_dir)
    assert temp_files(output_dir) == []  # the killed save's temporary file was cleaned up


def test_killed_while_training_resumes_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    process = start(train_net_command(out, *SCHEDULE), log)
    # Kill it once the second checkpoint is complete, i.e. while it trains iteration 10 or later.
    wait_until(lambda: tag(out) == "model_0000009.pth", process, log, "the second checkpoint")
    kill(process)

    iteration = assert_consistent(out)
    assert 9 <= iteration < MAX_ITER - 1
    assert not os.path.exists(out / "model_final.pth")
    resume_and_finish(out, tmp_path, expected_start=iteration + 1)


@pytest.mark.parametrize("pause_at", ["model_0000009.pth", "last_checkpoint:model_0000009.pth"])
def test_killed_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(tmp_path, pause_at):
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    marker = tmp_path / "paused"
    env = dict(SUBPROCESS_ENV, NL_TEST_PAUSE_AT=pause_at, NL_TEST_PAUSE_MARKER=str(marker))
    command = [sys.executable, "-c", PAUSING_TRAIN_NET, TRAIN_NET] + train_net_command(out, *SCHEDULE)[2:]
    process = start(command, log, env)
    wait_until(marker.exists, process, log, "the paused save")

    def check():
        # The save of the checkpoint after iteration 9 is under way, and visible only as a temp file.
        (temp,) = temp_files(out)
        if pause_at == "model_0000009.pth":
            assert os.path.basename(temp).startswith(".model_0000009.pth.")
            assert not os.path.exists(out / "model_0000009.pth")
            with pytest.raises(RuntimeError):  # really half a checkpoint
                torch.load(temp, weights_only=True)
        else:
            assert os.path.basename(temp).startswith(".last_checkpoint.")
            assert open(temp).read() == "model_0000009.pth"
            assert checkpoint_iteration(out / "model_0000009.pth") == 9
        assert tag(out) == "model_0000004.pth"
        assert assert_consistent(out) == 4

    check()
    kill(process)
    check()
    resume_and_finish(out, tmp_path, expected_start=5)


def test_training_from_scratch_refuses_to_overwrite_an_earlier_run(tmp_path):
    """Without --resume, an OUTPUT_DIR holding checkpoints is left untouched: nothing the user had is lost."""
    from tiny_training import train_net, train_net_args

    (tmp_path / "model_0000004.pth").write_bytes(b"earlier run")
    (tmp_path / "last_checkpoint").write_text("model_0000004.pth")
    before = sorted(os.listdir(tmp_path))
    module = train_net()
    args = module.default_argument_parser().parse_args(train_net_args(tmp_path))
    with pytest.raises(FileExistsError, match="--resume") as info:
        module.main(args)
    assert str(tmp_path) in str(info.value) and "model_0000004.pth" in str(info.value)
    assert sorted(os.listdir(tmp_path)) == before  # no config.yaml, log or checkpoint written
    assert (tmp_path / "model_0000004.pth").read_bytes() == b"earlier run"
