"""Loading a checkpoint never runs code from it; genuine .pth and detectron2-format .pkl files still load."""
import io
import os
import pickle
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch

from detectron2.engine import hooks

from nl_detectron.checkpoint import SafeCheckpointer, UnsafeCheckpointError, atomic_write, load_pkl
from nl_detectron.engine import Trainer

from tiny_training import one_thread, tiny_cfg, train_net, train_net_args  # noqa: F401 (autouse fixture)


class Payload:
    """An object whose unpickling calls ``function(*args)``: what a malicious checkpoint carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def os_system(marker):
    return Payload(os.system, f"touch {marker}"), "system"


def builtins_exec(marker):
    return Payload(exec, f"open({str(marker)!r}, 'w').close()"), "exec"


def write_malicious(path, payload):
    """A checkpoint in the format of ``path``'s extension with ``payload`` among its weights."""
    data = {"model": {"backbone.bottom_up.stem.conv1.weight": payload}, "__author__": "attacker"}
    if path.suffix == ".pth":
        torch.save(data, path)
    else:
        path.write_bytes(pickle.dumps(data))


def unrestricted_load(path):
    """What plain pickle / torch.load(weights_only=False) do with the file: run the payload."""
    if path.suffix == ".pth":
        return torch.load(path, weights_only=False)
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return tiny_cfg(tmp_path_factory.mktemp("out"))


@pytest.fixture
def model(cfg):
    torch.manual_seed(0)
    return Trainer.build_model(cfg)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("make_payload", [os_system, builtins_exec])
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path, model, suffix, make_payload):
    marker = tmp_path / "pwned"
    payload, global_name = make_payload(marker)
    path = tmp_path / f"evil{suffix}"
    write_malicious(path, payload)
    # The file is really malicious: an unrestricted load runs the payload.
    unrestricted_load(path)
    assert marker.exists()
    marker.unlink()

    before = state(model)
    with pytest.raises(UnsafeCheckpointError) as info:
        SafeCheckpointer(model).load(str(path))
    message = str(info.value)
    assert str(path) in message and global_name in message and "refusing to load" in message
    assert not marker.exists()
    assert_same_state(state(model), before)


def test_trainer_and_eval_only_use_the_safe_checkpointer(tmp_path, cfg):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    write_malicious(evil, os_system(marker)[0])

    trainer_cfg = cfg.clone()
    trainer_cfg.defrost()
    trainer_cfg.MODEL.WEIGHTS = str(evil)
    trainer = Trainer(trainer_cfg)
    assert isinstance(trainer.checkpointer, SafeCheckpointer)
    (periodic,) = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic.checkpointer is trainer.checkpointer
    with pytest.raises(UnsafeCheckpointError, match="evil.pkl"):
        trainer.resume_or_load(resume=False)

    # tools/train_net.py --eval-only MODEL.WEIGHTS evil.pth
    evil_pth = tmp_path / "evil.pth"
    write_malicious(evil_pth, os_system(marker)[0])
    module = train_net()
    args = module.default_argument_parser().parse_args(
        train_net_args(tmp_path / "eval", "MODEL.WEIGHTS", evil_pth, eval_only=True)
    )
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        module.main(args)
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_checkpoint(tmp_path, model):
    marker = tmp_path / "pwned"
    write_malicious(tmp_path / "model_0000009.pth", builtins_exec(marker)[0])
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeCheckpointError, match="model_0000009.pth"):
        SafeCheckpointer(model, str(tmp_path)).resume_or_load("", resume=True)
    assert not marker.exists()


def test_pth_written_by_the_checkpointer_loads(tmp_path, model, cfg):
    saved = state(model)
    SafeCheckpointer(model, str(tmp_path)).save("model_0000004", iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000004.pth"]  # no temp files

    torch.manual_seed(1)
    other = Trainer.build_model(cfg)
    assert not all(torch.equal(v, saved[k]) for k, v in other.state_dict().items())
    extra = SafeCheckpointer(other, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 4
    assert_same_state(state(other), saved)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_detectron2_model_zoo_pkl_loads(tmp_path, model, cfg, protocol):
    """The model zoo's format: {"model": {name: ndarray}, "__author__": ...}, names as in the model."""
    saved = state(model)
    weights = {k: v.numpy() for k, v in saved.items()}
    path = tmp_path / "zoo.pkl"
    path.write_bytes(
        pickle.dumps({"model": weights, "__author__": "nl_detectron tests", "matching_heuristics": True}, protocol)
    )
    torch.manual_seed(1)
    other = Trainer.build_model(cfg)
    SafeCheckpointer(other).load(str(path))
    assert_same_state(state(other), saved)


def test_caffe2_imagenet_pkl_loads_with_name_conversion(tmp_path, model):
    """ImageNet R-50.pkl's format: Caffe2 blob names, momentum blobs, Python 2 pickle protocol."""
    rng = np.random.RandomState(0)
    stem, res2 = model.backbone.bottom_up.stem, model.backbone.bottom_up.res2[0]
    blobs = {
        "conv1_w": rng.randn(*stem.conv1.weight.shape).astype(np.float32),
        "conv1_w_momentum": rng.randn(*stem.conv1.weight.shape).astype(np.float32),
        "res_conv1_bn_s": rng.rand(64).astype(np.float32),
        "res_conv1_bn_b": rng.rand(64).astype(np.float32),
        "res2_0_branch2a_w": rng.randn(*res2.conv1.weight.shape).astype(np.float32),
    }
    path = tmp_path / "R-18.pkl"
    path.write_bytes(pickle.dumps({"blobs": blobs}, protocol=2))
    SafeCheckpointer(model).load(str(path))
    assert np.array_equal(stem.conv1.weight.detach().numpy(), blobs["conv1_w"])
    assert np.array_equal(stem.conv1.norm.weight.detach().numpy(), blobs["res_conv1_bn_s"])
    assert np.array_equal(stem.conv1.norm.bias.detach().numpy(), blobs["res_conv1_bn_b"])
    assert np.array_equal(res2.conv1.weight.detach().numpy(), blobs["res2_0_branch2a_w"])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "last_checkpoint"
    target.write_text("model_0000004.pth")
    with pytest.raises(RuntimeError):
        with atomic_write(str(target), "w") as f:
            f.write("model_00000")
            raise RuntimeError("killed halfway")
    assert target.read_text() == "model_0000004.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]
    with atomic_write(str(target), "w") as f:
        f.write("model_0000009.pth")
    assert target.read_text() == "model_0000009.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_reads_what_weight_files_hold(protocol):
    """Containers, numpy arrays, scalars and dtypes; protocol 2 names builtins as Python 2's __builtin__."""
    data = {
        "model": OrderedDict(w=np.arange(6, dtype=np.float32).reshape(2, 3), n=np.int64(3)),
        "tags": {"a", "b"}, "shape": (2, 3), "raw": b"\x00\xff", "lr": 0.02,
    }
    loaded = load_pkl(io.BytesIO(pickle.dumps(data, protocol)))
    assert loaded.keys() == data.keys() and loaded["tags"] == data["tags"] and loaded["raw"] == data["raw"]
    assert np.array_equal(loaded["model"]["w"], data["model"]["w"]) and loaded["model"]["w"].dtype == np.float32
    assert loaded["model"]["n"] == 3 and isinstance(loaded["model"]["n"], np.int64)


def test_restricted_unpickler_refuses_other_classes():
    """Even an innocuous class is refused: nothing outside the allow-list is imported or called."""
    with pytest.raises(UnsafeCheckpointError, match=r"w.pkl: refusing to load collections.Counter"):
        load_pkl(io.BytesIO(pickle.dumps({"w": Counter("ab")})), filename="w.pkl")
