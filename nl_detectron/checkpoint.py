"""
Checkpoints that survive a killed process and never run code from a file.

:class:`SafeCheckpointer` is detectron2's :class:`DetectionCheckpointer` (model-zoo ``.pkl`` files, Caffe2
name conversion, ``matching_heuristics``, resuming through ``last_checkpoint``) with two changes:

* Every file it writes (``model_*.pth`` and ``last_checkpoint``) is written atomically: to a temporary
  file in the same folder, flushed and fsync'ed, then renamed over the target. A process killed while
  saving leaves the previous checkpoint and ``last_checkpoint`` as they were.
* Loading never unpickles arbitrary objects: ``.pth`` files go through
  ``torch.load(..., weights_only=True)``; detectron2-format ``.pkl`` files (pickled dicts of numpy arrays,
  as the model zoo and ImageNet ``R-50.pkl`` are) through :class:`RestrictedUnpickler`, which allows only
  the classes such files are made of.
"""
import glob
import os
import pickle
import uuid

import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint import detection_checkpoint as d2_detection_checkpoint

__all__ = ["SafeCheckpointer", "RestrictedUnpickler", "UnsafeCheckpointError", "load_pkl", "atomic_write"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint that needs more than tensors, numpy arrays and plain containers to be unpickled."""


# (module, name) of every class or function a detectron2-format .pkl may reference: containers and
# numpy arrays, scalars and dtypes, under numpy 1's and numpy 2's module names.
PKL_ALLOWED_GLOBALS = frozenset(
    [("collections", "OrderedDict")]
    + [("builtins", name) for name in ("set", "frozenset", "bytearray", "complex")]
    # Python 3 pickles bytes for protocols < 3 as _codecs.encode(str, "latin1").
    + [("_codecs", "encode")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    + [
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))
    ]
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global outside :data:`PKL_ALLOWED_GLOBALS`, so it can run no code."""

    def __init__(self, file, *, filename: str = "<pickle>", encoding: str = "latin1"):
        super().__init__(file, encoding=encoding)
        self.filename = filename

    def find_class(self, module, name):
        # Python 2 pickles (the Caffe2 model zoo) name the builtins module __builtin__.
        module = "builtins" if module == "__builtin__" else module
        if (module, name) not in PKL_ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"{self.filename}: refusing to load {module}.{name}: a detectron2-format .pkl checkpoint "
                "holds only dicts of numpy arrays, so this file is not one (it may run code when "
                "unpickled). Allowed globals: "
                + ", ".join(sorted(f"{m}.{n}" for m, n in PKL_ALLOWED_GLOBALS))
            )
        return super().find_class(module, name)

    def persistent_load(self, pid):
        raise UnsafeCheckpointError(
            f"{self.filename}: refusing to load persistent id {pid!r}: not a detectron2-format .pkl file"
        )


def load_pkl(file, *, filename: str = "<pickle>", encoding: str = "latin1"):
    """``pickle.load`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(file, filename=filename, encoding=encoding).load()


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside detectron2's ``DetectionCheckpointer._load_file``."""

    def __init__(self, filename):
        self.filename = filename

    def load(self, file, *, encoding="latin1"):
        return load_pkl(file, filename=self.filename, encoding=encoding)


class atomic_write:
    """
    ``with atomic_write(path, "wb") as f:`` writes a temporary file next to ``path`` and, when the block
    ends without an exception, flushes and fsyncs it and renames it to ``path`` (then fsyncs the folder),
    so ``path`` is always either its old content or the complete new one. On an exception the temporary
    file is removed. Temporary files of a killed writer (``.<name>.*.tmp``) are removed by the next
    write of the same ``path``.
    """

    def __init__(self, path: str, mode: str = "wb"):
        if "w" not in mode:
            raise ValueError(f"atomic_write: mode={mode!r} must be a write mode ('w' or 'wb')")
        self.path, self.mode = path, mode
        self.folder, self.name = os.path.split(os.path.abspath(path))

    def __enter__(self):
        for stale in glob.glob(os.path.join(glob.escape(self.folder), f".{glob.escape(self.name)}.*.tmp")):
            os.remove(stale)
        self.tmp_path = os.path.join(self.folder, f".{self.name}.{uuid.uuid4().hex[:12]}.tmp")
        # Created like open(path, "w") would (permissions from the umask), unlike tempfile's 0600.
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.file = os.fdopen(fd, self.mode)
        return self.file

    def __exit__(self, exc_type, exc, tb):
        committed = False
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
                os.replace(self.tmp_path, self.path)
                committed = True
                _fsync_folder(self.folder)  # makes the rename itself durable
        finally:
            self.file.close()
            if not committed:
                os.remove(self.tmp_path)
        return False


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _AtomicWritePathManager:
    """A path manager that opens files for writing with :class:`atomic_write`; everything else is delegated."""

    def __init__(self, base):
        self._base = base

    def open(self, path, mode="r", **kwargs):
        # fvcore's Checkpointer writes only as ``with path_manager.open(...) as f``; remote URIs
        # (``scheme://...``) are left to their own path handlers.
        if "w" in mode and "://" not in path:
            return atomic_write(path, mode)
        return self._base.open(path, mode, **kwargs)

    def __getattr__(self, name):
        return getattr(self._base, name)


class SafeCheckpointer(DetectionCheckpointer):
    """
    detectron2's :class:`DetectionCheckpointer` with atomic saves and loading that runs no code from the
    file (see the module docstring). Same constructor and methods.

    Raises (from ``load``/``resume_or_load``):
        UnsafeCheckpointError: a ``.pth`` that needs more than tensors and plain containers, or a ``.pkl``
            that references anything outside :data:`PKL_ALLOWED_GLOBALS`.
    """

    def __init__(self, model, save_dir="", *, save_to_disk=None, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        # fvcore's save() and tag_last_checkpoint() write through self.path_manager.open(..., "w[b]").
        self.path_manager = _AtomicWritePathManager(self.path_manager)

    def _load_file(self, filename):
        if not filename.endswith(".pkl"):
            # .pth goes through _torch_load below; .pyth through torch.load, weights_only by default.
            return super()._load_file(filename)
        # detectron2 reads .pkl with pickle.load, then tells the model zoo and Caffe2 formats apart:
        # keep that, with the restricted unpickler in place of pickle.
        original = d2_detection_checkpoint.pickle
        d2_detection_checkpoint.pickle = _RestrictedPickleModule(filename)
        try:
            return super()._load_file(filename)
        finally:
            d2_detection_checkpoint.pickle = original

    def _torch_load(self, f):
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{f}: refusing to load: torch.load(weights_only=True) allows only tensors and plain "
                f"containers, and this file needs more, so it may run code when unpickled. {e}"
            ) from None
