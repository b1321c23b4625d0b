"""Small, local datasets for examples, reports and tests.

Nothing here downloads anything: :func:`load_digits` uses the 8x8 digits bundled with
scikit-learn (an optional dependency, imported only when called), :func:`load_mnist1d`
generates MNIST-1D (Greydanus 2020) offline with the ``mnist1d`` package (optional, imported
only when called) and :func:`load_mnist` reads the official MNIST IDX ``.gz`` files from a
folder you point it at.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from pathlib import Path

import torch

__all__ = ["load_digits", "load_mnist1d", "load_mnist", "MNIST_FILES", "MNIST_MEAN", "MNIST_STD"]

#: Mean and standard deviation of the MNIST training pixels (after /255), the usual constants.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The four canonical files: (expected example count, size in bytes, SHA-256 of the .gz).
# The t10k checksums were computed from the official files; the train checksums are the
# widely published ones (the same values appear in TensorFlow Datasets and many loaders),
# and both test values agree with that same published table.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        60000, 9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (
        60000, 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (
        10000, 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (
        10000, 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_FIX_HINT = ("Use the official MNIST file (train-/t10k- images-idx3 / labels-idx1 -ubyte.gz, "
             "not unpacked)")


def load_digits(test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), split once, stratified.

    Returns ``(x_train, y_train, x_test, y_test)``: inputs ``[N, 64]`` with pixels / 16 in
    ``[0, 1]`` (``dtype``), labels ``[N]`` int64 in ``0..9``. The split is a stratified
    shuffle with ``random_state=seed``, so it is the same on every call and machine.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, "
                         f"got {test_fraction!r}")
    _check_float_dtype(dtype)
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("natgrad.datasets.load_digits needs scikit-learn: "
                          "pip install 'natgrad[data]'") from exc
    bunch = _sk_load_digits()
    x, y = bunch.data / 16.0, bunch.target
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=float(test_fraction), random_state=seed, stratify=y)
    return (torch.as_tensor(x_tr, dtype=dtype), torch.as_tensor(y_tr, dtype=torch.long),
            torch.as_tensor(x_te, dtype=dtype), torch.as_tensor(y_te, dtype=torch.long))


def load_mnist1d(dtype: torch.dtype = torch.float32):
    """MNIST-1D (Greydanus 2020) with the package's default arguments, generated offline.

    Calls ``mnist1d.data.make_dataset(get_dataset_args())`` (seed 42: the published frozen
    dataset, 4,000 train / 1,000 test signals of 40 points, standardised globally) and returns
    ``(x_train, y_train, x_test, y_test)``: inputs ``[N, 40]`` of ``dtype``, labels ``[N]``
    int64 in ``0..9``. The generator seeds Python's and numpy's global RNGs; their states are
    restored afterwards, so calling this does not disturb the caller's random streams.
    Generation takes a few seconds; the result is cached for the life of the process.
    """
    _check_float_dtype(dtype)
    x_tr, y_tr, x_te, y_te = _mnist1d_arrays()
    return (torch.as_tensor(x_tr, dtype=dtype), torch.as_tensor(y_tr, dtype=torch.long),
            torch.as_tensor(x_te, dtype=dtype), torch.as_tensor(y_te, dtype=torch.long))


_MNIST1D_CACHE: list = []


def _mnist1d_arrays():
    if _MNIST1D_CACHE:
        return _MNIST1D_CACHE[0]
    import random

    import numpy as np
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("natgrad.datasets.load_mnist1d needs the mnist1d package: "
                          "pip install 'natgrad[data]'") from exc
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    arrays = (np.array(data["x"]), np.array(data["y"]), np.array(data["x_test"]),
              np.array(data["y_test"]))
    _MNIST1D_CACHE.append(arrays)
    return arrays


def load_mnist(folder, split: str = "test", limit: int | None = None, flatten: bool = True,
               normalize: bool = True, dtype: torch.dtype = torch.float32, verify: bool = True):
    """MNIST from the official IDX files in ``folder``.

    Reads ``{train,t10k}-images-idx3-ubyte.gz`` and ``{train,t10k}-labels-idx1-ubyte.gz``
    for ``split`` ``"train"`` (60,000) or ``"test"`` (10,000). Returns ``(x, y)``: ``x`` is
    ``[N, 784]`` (or ``[N, 1, 28, 28]`` with ``flatten=False``) of ``dtype``, pixels / 255,
    then standardised with mean 0.1307 and std 0.3081 if ``normalize``; ``y`` is int64.
    ``limit`` keeps the first ``limit`` examples.

    With ``verify=True`` (default) each file's SHA-256 must be that of the canonical file;
    pass ``verify=False`` to read another IDX dataset with the same names (Fashion-MNIST,
    a subset you made) — the IDX structure (magic numbers, sizes, labels 0..9) is always
    checked. Raises FileNotFoundError for a missing folder/file and ValueError for a file
    that is corrupt, truncated or not the canonical one; the message names the file.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    _check_float_dtype(dtype)
    if folder is None:
        raise ValueError("load_mnist needs the folder holding the MNIST IDX .gz files")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"MNIST folder {str(folder)!r} does not exist or is not a directory; put the "
            f"official files ({', '.join(MNIST_FILES)}) in a folder and pass its path")
    prefix = _SPLIT_PREFIX[split]
    images_path = folder / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = folder / f"{prefix}-labels-idx1-ubyte.gz"
    images = _read_idx(images_path, _IMAGES_MAGIC, verify)
    labels = _read_idx(labels_path, _LABELS_MAGIC, verify)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path.name} holds {images.shape[0]} images but "
                         f"{labels_path.name} holds {labels.shape[0]} labels; the two files "
                         f"of a split must belong together")
    if labels.numel() and int(labels.max()) > 9:
        raise ValueError(f"{labels_path} has label {int(labels.max())}; MNIST labels are 0..9")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = images.to(dtype) / 255.0
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    x = x.reshape(x.shape[0], -1) if flatten else x.unsqueeze(1)
    return x, labels.long()


def _check_float_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


def _read_idx(path: Path, magic: int, verify: bool) -> torch.Tensor:
    """Read one gzip IDX file of unsigned bytes into a uint8 tensor, checking it fully."""
    if not path.is_file():
        raise FileNotFoundError(f"MNIST file {str(path)!r} is missing; {_FIX_HINT} in "
                                f"{str(path.parent)!r}")
    raw = path.read_bytes()
    known = MNIST_FILES.get(path.name)
    if verify and known is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != known[2]:
            raise ValueError(
                f"{str(path)!r} is not the canonical MNIST file: SHA-256 {digest} "
                f"(size {len(raw)} bytes), expected {known[2]} (size {known[1]} bytes). It is "
                f"corrupt or truncated: replace it. {_FIX_HINT}; pass verify=False only if "
                f"you deliberately use another IDX dataset with these names")
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{str(path)!r} is not a complete gzip file ({exc}); it is corrupt "
                         f"or truncated: replace it. {_FIX_HINT}") from exc
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{str(path)!r}: IDX header truncated ({len(data)} bytes). {_FIX_HINT}")
    (found,) = struct.unpack(">i", data[:4])
    if found != magic:
        what = "images (idx3)" if magic == _IMAGES_MAGIC else "labels (idx1)"
        raise ValueError(f"{str(path)!r}: bad IDX magic number {found:#010x}, expected "
                         f"{magic:#010x} for MNIST {what}. {_FIX_HINT}")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    if ndim == 3 and dims[1:] != (28, 28):
        raise ValueError(f"{str(path)!r}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = 1
    for d in dims:
        expected *= d
    if len(data) - header != expected:
        raise ValueError(f"{str(path)!r}: header announces {dims} = {expected} bytes of data "
                         f"but the file holds {len(data) - header}; it is truncated or "
                         f"corrupt. {_FIX_HINT}")
    tensor = torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8)
    return tensor.reshape(dims)
