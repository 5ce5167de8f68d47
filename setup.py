from setuptools import find_packages, setup

setup(
    name="nl_detectron",
    version="0.1.0",
    description="Non-local blocks (Wang et al., CVPR 2018) for detectron2: NonLocalBlock2d and non-local ResNet/FPN backbones",
    packages=find_packages(include=["nl_detectron", "nl_detectron.*"]),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 are installed by `make install` (see requirements.txt and
    # scripts/install_detectron2.py): detectron2 is not on PyPI.
    install_requires=[],
)
