"""Shared helpers for natgrad's benchmarks.

Paths, data loading (MNIST idx files, sklearn digits), environment information, atomic JSON
writing and plain-text tables; the timing and memory measurements are in :mod:`_measure`.
Nothing here imports natgrad, so the helpers work before the package does.
"""
from __future__ import annotations

import datetime as _dt
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``shared/`` is a sibling of the repository root (``/work/shared`` next to ``/work/main``).
SHARED_DIR = REPO_ROOT.parent / "shared"
DEFAULT_MNIST_DIR = SHARED_DIR / "data" / "mnist"

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
MNIST_TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


def use_repo_sources() -> None:
    """Put ``<repo>/src`` first on ``sys.path`` so the checkout's natgrad is benchmarked,
    whether or not (and whichever version) the package is installed in the environment."""
    src = str(REPO_ROOT / "src")
    if (REPO_ROOT / "src").is_dir() and src not in sys.path:
        sys.path.insert(0, src)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read a (gzipped) idx file: big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: idx magic {magic} != expected {expected_magic}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != math.prod(dims):
        raise ValueError(f"{path}: {data.size} values for dims {dims}")
    return data.reshape(dims)


def mnist_available(mnist_dir: Path | str = DEFAULT_MNIST_DIR) -> bool:
    d = Path(mnist_dir)
    return (d / MNIST_TEST_IMAGES).is_file() and (d / MNIST_TEST_LABELS).is_file()


def load_mnist_test(mnist_dir: Path | str = DEFAULT_MNIST_DIR, n: int | None = None,
                    flatten: bool = True):
    """The MNIST test set as float32 torch tensors: pixels/255, standardised with
    (x - 0.1307) / 0.3081; ``[n, 784]`` if ``flatten`` else ``[n, 1, 28, 28]``; int64 labels.
    Only the first ``n`` examples (file order) when ``n`` is given."""
    import torch

    d = Path(mnist_dir)
    images = _read_idx(d / MNIST_TEST_IMAGES, 2051)
    labels = _read_idx(d / MNIST_TEST_LABELS, 2049)
    if n is not None:
        images, labels = images[:n], labels[:n]
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, 28, 28)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels.astype(np.int64))


def load_digits(n: int | None = None):
    """sklearn's 8x8 digits (1,797 examples, bundled with scikit-learn) as float32
    ``[n, 64]`` tensors with pixels/16, and int64 labels."""
    import torch
    from sklearn.datasets import load_digits as _load

    bunch = _load()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    if n is not None:
        x, y = x[:n], y[:n]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


def synthetic_classification(n: int, shape: Sequence[int], classes: int, seed: int = 0):
    """Random standard-normal inputs and uniform labels with the given shapes: a stand-in
    for smoke runs where the real data files are not available. Not for figures."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=str(REPO_ROOT), capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages (other processes competing for the CPUs make
    timings noisy; a load well above 0 on an otherwise idle benchmark machine is a
    warning sign)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment_info(quick: bool, **extra: Any) -> dict:
    """Versions, threads, CPU, date and the checkout's commit, for the JSON header."""
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(quick),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
    }
    try:
        import natgrad

        info["natgrad"] = getattr(natgrad, "__version__", None)
        info["natgrad_path"] = str(Path(natgrad.__file__).resolve().parent)
    except Exception as exc:  # report, do not fail: the header is written even then
        info["natgrad"] = None
        info["natgrad_import_error"] = f"{type(exc).__name__}: {exc}"
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_commit"] = commit
    info["git_dirty"] = None if status is None else bool(status)
    info.update(extra)
    return info


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def write_json_atomic(path: Path | str, obj: Any) -> None:
    """Write ``obj`` as JSON so that ``path`` is either the old or the new complete file:
    write a temporary file in the same directory, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name + ".",
                               suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(obj, fh, indent=2, allow_nan=False, default=_json_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/inf: map them to null."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                 align: str | None = None) -> str:
    """Plain-text table with columns padded to the widest cell; ``align`` is one char per
    column, ``l`` or ``r``."""
    align = align or "l" * len(headers)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def fmt(cells: Sequence[str]) -> str:
        parts = [str(c).rjust(w) if a == "r" else str(c).ljust(w)
                 for c, w, a in zip(cells, widths, align)]
        return "  ".join(parts).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)
