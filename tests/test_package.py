"""
nl_detectron as another project uses it: the wheel that ``pip wheel .`` builds, installed (not editable)
into a temporary location and imported from a temporary working directory outside the repository, finds
every config of configs/ inside itself, builds the Table 5 models, and trains with detectron2's own
DefaultTrainer. Also nl_detectron.model_zoo in this checkout.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from detectron2.config import CfgNode
from omegaconf import DictConfig

from nl_detectron import model_zoo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO_CONFIGS = os.path.join(REPO, "configs")


def repo_config_files():
    """Every file under the repository's configs/, as a name relative to it."""
    names = []
    for folder, _, files in os.walk(REPO_CONFIGS):
        names += [os.path.relpath(os.path.join(folder, f), REPO_CONFIGS).replace(os.sep, "/") for f in files]
    return sorted(n for n in names if "__pycache__" not in n)


def test_model_zoo_finds_the_checkouts_configs():
    assert model_zoo.list_configs() == [n for n in repo_config_files() if n.endswith((".yaml", ".py"))]
    path = model_zoo.get_config_file("quick/tiny_mask_rcnn_nl_R18.yaml")
    assert os.path.samefile(path, os.path.join(REPO_CONFIGS, "quick", "tiny_mask_rcnn_nl_R18.yaml"))
    cfg = model_zoo.get_config("mask_rcnn_nl_R50.yaml")
    assert isinstance(cfg, CfgNode)
    # Through its _BASE_ chain (mask_rcnn_R50.yaml, then Base-RCNN-FPN.yaml) and add_nonlocal_config.
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_nl_backbone"
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads" and cfg.MODEL.MASK_ON
    assert cfg.MODEL.NONLOCAL.SUBSAMPLE_INPUT is True
    lazy = model_zoo.get_config("mask_rcnn_nl_R50.py")
    assert isinstance(lazy, DictConfig)
    assert [list(loc) for loc in lazy.model.backbone.bottom_up.locations] == [["res4", -1]]


@pytest.mark.parametrize(
    "name", ["mask_rcnn_nl_R49.yaml", "configs/mask_rcnn_nl_R50.yaml", "Base-RCNN-FPN", "", "../setup.py", "quick"]
)
def test_unknown_config_names_it_and_lists_the_valid_ones(name):
    with pytest.raises(RuntimeError, match=f"^{name!r} is not one of nl_detectron's configs") as e:
        model_zoo.get_config_file(name)
    for valid in model_zoo.list_configs():
        assert valid in str(e.value)


# Runs in the fresh interpreter, with the installed copy first on sys.path and a cwd outside the repository.
INSTALLED_CHECKS = r'''
import importlib.metadata
import json
import os
import sys

SITE, OUTPUT, EXPECTED = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

import nl_detectron
from nl_detectron import model_zoo

# The installed copy, all of it: not the checkout, not the venv's editable install of a checkout.
assert nl_detectron.__file__ == os.path.join(SITE, "nl_detectron", "__init__.py"), nl_detectron.__file__
loaded = [m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "nl_detectron"]
assert all(f.startswith(SITE + os.sep) for f in loaded), loaded
dist = importlib.metadata.distribution("nl_detectron")
assert dist.version == nl_detectron.__version__, (dist.version, nl_detectron.__version__)
requires = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in dist.requires}
assert {"fvcore", "omegaconf", "numpy", "Pillow", "pycocotools"} <= requires, requires

# Every shipped config, from inside the installed package.
assert model_zoo.list_configs() == EXPECTED, model_zoo.list_configs()
for name in EXPECTED:
    path = model_zoo.get_config_file(name)
    assert path == os.path.join(SITE, "nl_detectron", "configs", *name.split("/")), path
    model_zoo.get_config(name)  # _BASE_ chains resolve beside the installed files
try:
    model_zoo.get_config_file("mask_rcnn_nl_R49.yaml")
    raise AssertionError("an unknown config was accepted")
except RuntimeError as e:
    assert "'mask_rcnn_nl_R49.yaml'" in str(e) and "mask_rcnn_nl_R50.yaml" in str(e), e

import torch
from detectron2.config import instantiate
from detectron2.engine import DefaultTrainer
from detectron2.modeling import build_model

torch.set_num_threads(1)
# The Table 5 model, from the YAML config and from its LazyConfig twin.
cfg = model_zoo.get_config("mask_rcnn_nl_R50.yaml")
cfg.MODEL.DEVICE, cfg.MODEL.WEIGHTS = "cpu", ""
from_yaml = build_model(cfg)
from_lazy = instantiate(model_zoo.get_config("mask_rcnn_nl_R50.py").model)
for model in (from_yaml, from_lazy):
    assert list(nl_detectron.nonlocal_blocks(model)) == ["backbone.bottom_up.res4.nonlocal5"]
assert [n for n, _ in from_yaml.named_parameters()] == [n for n, _ in from_lazy.named_parameters()]

# What another project writes: detectron2's own trainer on a packaged quick config.
cfg = model_zoo.get_config("quick/tiny_mask_rcnn_nl_R18.yaml")
cfg.OUTPUT_DIR = OUTPUT
cfg.SOLVER.MAX_ITER = 3
trainer = DefaultTrainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
print("INSTALLED_CHECKS_PASSED")
'''


@pytest.mark.slow
def test_wheel_installed_outside_the_repository_works(tmp_path):
    # Build from a copy of the checkout, so that setuptools' build/ and egg-info stay out of the repository.
    source = tmp_path / "source"
    shutil.copytree(
        REPO, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "output", "build", "dist", "*.egg-info", "__pycache__"),
    )
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    # --no-build-isolation: the running environment's setuptools, no download.
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = wheels.glob("nl_detectron-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
        check=True, capture_output=True, cwd=tmp_path,
    )

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    script = workdir / "checks.py"
    script.write_text(INSTALLED_CHECKS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    env["PYTHONPATH"] = str(site)  # not the repository, which tests usually import from
    env["OMP_NUM_THREADS"] = "1"
    expected = [n for n in repo_config_files() if n.endswith((".yaml", ".py"))]
    run = subprocess.run(
        [sys.executable, str(script), str(site), str(workdir / "output"), json.dumps(expected)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0 and "INSTALLED_CHECKS_PASSED" in run.stdout, (run.stdout + run.stderr)[-5000:]

    # Every file of configs/ is in the installed package, byte for byte (configs/ is the one source).
    installed = site / "nl_detectron" / "configs"
    for name in repo_config_files():
        assert (installed / name).read_bytes() == open(os.path.join(REPO_CONFIGS, name), "rb").read(), name
    records = [json.loads(line) for line in open(workdir / "output" / "metrics.json")]
    assert [r["iteration"] for r in records if "total_loss" in r][-1] == 2
    assert (workdir / "output" / "model_final.pth").is_file()
