import os
import re
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    """The one version string: ``__version__`` in nl_detectron/__init__.py."""
    with open(os.path.join(HERE, "nl_detectron", "__init__.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


class build_py_with_configs(build_py):
    """
    Build the repository's configs/ (every file, subfolders included) into the package as
    ``nl_detectron/configs``, as detectron2's setup.py builds its configs into ``detectron2.model_zoo``:
    configs/ stays the one source, and an installed nl_detectron finds them with importlib.resources.
    An editable install reads configs/ in place (nl_detectron.model_zoo falls back to it).
    """

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source, target = os.path.join(HERE, "configs"), os.path.join(self.build_lib, "nl_detectron", "configs")
        shutil.rmtree(target, ignore_errors=True)  # a file since removed from configs/ must not linger
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    def get_outputs(self, include_bytecode=1):
        outputs = super().get_outputs(include_bytecode)
        target = os.path.join(self.build_lib, "nl_detectron", "configs")
        for folder, _, files in os.walk(os.path.join(HERE, "configs")):
            rel = os.path.relpath(folder, os.path.join(HERE, "configs"))
            outputs += [os.path.normpath(os.path.join(target, rel, f)) for f in files if not f.endswith(".pyc")]
        return outputs


setup(
    name="nl_detectron",
    version=version(),
    description="Non-local blocks (Wang et al., CVPR 2018) for detectron2: NonLocalBlock2d and non-local ResNet/FPN backbones",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["nl_detectron", "nl_detectron.*"]),
    cmdclass={"build_py": build_py_with_configs},
    python_requires=">=3.10",  # what torch 2.14 requires
    # What nl_detectron imports that the package index has. torch, torchvision and detectron2 are
    # prerequisites installed beforehand (detectron2 is not on the index; torch is your own build for
    # your CUDA): `make install` installs all of it from requirements.txt and scripts/install_detectron2.py.
    install_requires=[
        "fvcore>=0.1.5.post20221221",  # nl_detectron.flop_count
        "omegaconf>=2.1,<2.4",  # LazyConfig (the range detectron2 supports)
        "numpy",
        "Pillow>=7.1",  # the built-in dataset's images
        "pycocotools>=2.0.7",  # COCOEvaluator of the trainer
        # detectron2.model_zoo, which the LazyConfig config and nl_detectron.model_zoo use, imports
        # pkg_resources, gone from setuptools 81.
        "setuptools<81",
    ],
)
