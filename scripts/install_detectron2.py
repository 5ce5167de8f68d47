#!/usr/bin/env python
"""Install detectron2's Python code into the running interpreter, without its compiled ``_C``.

detectron2 is not on PyPI. The one usable wheel there, ``sal-detectron2==0.7.2``, carries upstream
detectron2 main at commit a59f0563 (2024-04-17), but it is tagged cp310, ships a ``_C`` extension built
for another torch, bundles a top-level ``tools`` package, and its metadata asks for ``numpy<2`` while
omitting fvcore and iopath. Upstream detectron2 runs Mask R-CNN and COCO evaluation without ``_C``
(rotated boxes, deformable conv and the fast COCOeval are then unavailable), so this script:

1. does nothing if ``import detectron2`` already works (a user's own build is left alone);
2. downloads that wheel (``pip download --no-deps --only-binary=:all: --python-version 3.10``);
3. rewrites it as a pure-Python ``py3-none-any`` wheel: drops ``_C*.so`` and the bundled ``tools``
   package, replaces ``Requires-Dist`` with the dependencies that requirements.txt installs, and
   regenerates RECORD;
4. ``pip install``s the result, so ``pip show sal-detectron2`` and ``pip uninstall sal-detectron2``
   work as for any package.

Usage: ``python scripts/install_detectron2.py [--wheel PATH]`` (``--wheel`` skips the download).
"""
import argparse
import base64
import hashlib
import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DIST = "sal-detectron2"
VERSION = "0.7.2"
# What detectron2's Python code imports at run time; versions are pinned in requirements.txt.
REQUIRES = [
    "Pillow>=7.1", "matplotlib", "pycocotools>=2.0.2", "termcolor>=1.1", "yacs>=0.1.8", "tabulate",
    "cloudpickle", "tqdm>4.29.0", "tensorboard", "fvcore>=0.1.5", "iopath>=0.1.7",
    "omegaconf>=2.1,<2.4", "packaging", "numpy",
]


def _keep(name: str) -> bool:
    top = name.split("/", 1)[0]
    if top == "tools":  # would shadow every project's own tools/ package
        return False
    if name.startswith("detectron2/_C") and name.endswith(".so"):  # built for another torch
        return False
    return not name.endswith("/RECORD")


def _rewrite_metadata(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith("Requires-Dist:")]
    # Keep the header block first, then our requirements, then the long description (if any).
    try:
        split = lines.index("")
    except ValueError:
        split = len(lines)
    reqs = [f"Requires-Dist: {r}" for r in REQUIRES]
    return "\n".join(lines[:split] + reqs + lines[split:]) + "\n"


def _rewrite_wheel_file(text: str) -> str:
    out = []
    for ln in text.splitlines():
        if ln.startswith("Tag:"):
            ln = "Tag: py3-none-any"
        elif ln.startswith("Root-Is-Purelib:"):
            ln = "Root-Is-Purelib: true"
        out.append(ln)
    return "\n".join(out) + "\n"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack(src: Path, dst_dir: Path) -> Path:
    """Write the pure-Python wheel built from ``src`` into ``dst_dir`` and return its path."""
    info = f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    dst = dst_dir / f"{DIST.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            if item.is_dir() or not _keep(item.filename):
                continue
            data = zin.read(item)
            if item.filename == f"{info}/METADATA":
                data = _rewrite_metadata(data.decode()).encode()
            elif item.filename == f"{info}/WHEEL":
                data = _rewrite_wheel_file(data.decode()).encode()
            elif item.filename == f"{info}/top_level.txt":
                data = b"detectron2\n"
            zout.writestr(item.filename, data)
            record.append(_record_line(item.filename, data))
        record.append(f"{info}/RECORD,,")
        zout.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return dst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheel", type=Path, help="use this sal-detectron2 wheel instead of downloading it")
    args = parser.parse_args()

    if importlib.util.find_spec("detectron2") is not None:
        print("detectron2 is already importable here; leaving it alone.")
        return 0
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheel = args.wheel
        if wheel is None:
            subprocess.check_call(pip + [
                "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.10",
                f"{DIST}=={VERSION}", "-d", str(tmp),
            ])
            wheel = next(tmp.glob("*.whl"))
        out = tmp / "out"
        out.mkdir()
        pure = repack(wheel, out)
        # Dependencies come from requirements.txt, installed before this script runs.
        subprocess.check_call(pip + ["install", "--no-deps", str(pure)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
