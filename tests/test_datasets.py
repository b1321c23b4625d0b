"""natgrad.datasets: the bundled digits and the MNIST IDX reader (real files + corrupt copies)."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from natgrad import datasets
from natgrad.datasets import MNIST_MEAN, MNIST_STD, load_digits, load_mnist

# The official MNIST files live in shared/ beside the repository (CI clones the repo there too).
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


@pytest.fixture(scope="module")
def mnist_dir() -> Path:
    if not (MNIST_DIR / TEST_IMAGES).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the MNIST test files are missing from {MNIST_DIR}")
        pytest.skip(f"MNIST test files not found in {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def mnist_test(mnist_dir):
    return load_mnist(mnist_dir, split="test")


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes,
              compress: bool = True) -> Path:
    raw = struct.pack(f">i{len(dims)}i", magic, *dims) + payload
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def tiny_mnist(folder: Path, n: int = 3, prefix: str = "t10k") -> tuple[torch.Tensor, torch.Tensor]:
    """A valid (non-canonical) IDX pair with n examples."""
    images = torch.arange(n * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8)
    labels = torch.arange(n, dtype=torch.uint8).remainder(10)
    write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), images.numpy().tobytes())
    write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels.numpy().tobytes())
    return images.reshape(n, 28, 28), labels


# ----------------------------------------------------------------------------- digits

def test_digits_shapes_range_and_stratified_split():
    x_tr, y_tr, x_te, y_te = load_digits()
    assert x_tr.shape == (1437, 64) and x_te.shape == (360, 64)
    assert y_tr.shape == (1437,) and y_te.shape == (360,)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0  # pixels / 16
    assert set(y_tr.tolist()) == set(range(10)) == set(y_te.tolist())
    # stratified: every class is ~20% in the test split
    for c in range(10):
        n_te, n_all = int((y_te == c).sum()), int((y_te == c).sum() + (y_tr == c).sum())
        assert abs(n_te - 0.2 * n_all) <= 1


def test_digits_split_is_fixed_and_seeded():
    a, b = load_digits(dtype=torch.float64), load_digits(dtype=torch.float64)
    assert a[0].dtype == torch.float64
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    c = load_digits(seed=1)
    assert not torch.equal(a[1], c[1])
    x_tr, _, x_te, _ = load_digits(test_fraction=0.5)
    assert x_tr.shape[0] + x_te.shape[0] == 1797 and abs(x_te.shape[0] - 899) <= 1


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.2", True])
def test_digits_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=bad)


def test_digits_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_digits(dtype=torch.int64)


# ----------------------------------------------------------------------------- MNIST, real files

def test_mnist_test_split_shapes_and_normalization(mnist_test):
    x, y = mnist_test
    assert x.shape == (10000, 784) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert y.min() == 0 and y.max() == 9
    assert torch.bincount(y).tolist()[:3] == [980, 1135, 1032]  # the known test class counts
    # standardised with the training-set constants: the test set lands close to (0, 1)
    assert abs(x.mean().item()) < 0.02
    assert abs(x.std().item() - 1.0) < 0.02
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD)


def test_mnist_raw_limit_unflattened_dtype(mnist_dir, mnist_test):
    x, y = load_mnist(mnist_dir, limit=100, flatten=False, normalize=False, dtype=torch.float64)
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float64
    assert 0.0 <= x.min().item() and x.max().item() == 1.0
    assert abs(x.mean().item() - 0.13) < 0.03
    assert y.tolist()[:10] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the famous first test labels
    # same pixels as the normalised full load
    x_full, y_full = mnist_test
    renorm = ((x.reshape(100, -1) - MNIST_MEAN) / MNIST_STD).float()
    assert torch.allclose(renorm, x_full[:100], atol=1e-6)
    assert torch.equal(y, y_full[:100])


def test_mnist_train_split_missing_names_the_file(mnist_dir):
    if (mnist_dir / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("train files present")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_mnist(mnist_dir, split="train")


def test_mnist_known_checksums_cover_the_four_files():
    assert set(datasets.MNIST_FILES) == {
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", TEST_IMAGES, TEST_LABELS}
    assert all(len(sha) == 64 for _, _, sha in datasets.MNIST_FILES.values())


# ----------------------------------------------------------------------------- MNIST, bad input

def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        load_mnist(missing)
    assert str(missing) in str(info.value)


def test_missing_labels_file(tmp_path, mnist_dir):
    shutil.copy(mnist_dir / TEST_IMAGES, tmp_path / TEST_IMAGES)
    with pytest.raises(FileNotFoundError, match=TEST_LABELS):
        load_mnist(tmp_path)


def test_checksum_mismatch(tmp_path, mnist_dir):
    # a structurally valid file that is not the canonical one
    shutil.copy(mnist_dir / TEST_IMAGES, tmp_path / TEST_IMAGES)
    write_idx(tmp_path / TEST_LABELS, 2049, (10000,), bytes(10000))
    with pytest.raises(ValueError, match="SHA-256") as info:
        load_mnist(tmp_path)
    assert TEST_LABELS in str(info.value) and "verify=False" in str(info.value)
    # verify=False reads it (all labels 0)
    _, y = load_mnist(tmp_path, verify=False)
    assert y.shape == (10000,) and int(y.abs().sum()) == 0


def test_truncated_file(tmp_path, mnist_dir):
    data = (mnist_dir / TEST_IMAGES).read_bytes()
    (tmp_path / TEST_IMAGES).write_bytes(data[: len(data) // 2])
    shutil.copy(mnist_dir / TEST_LABELS, tmp_path / TEST_LABELS)
    with pytest.raises(ValueError, match="SHA-256.*corrupt or truncated") as info:
        load_mnist(tmp_path)
    assert TEST_IMAGES in str(info.value)
    with pytest.raises(ValueError, match="not a complete gzip file"):
        load_mnist(tmp_path, verify=False)


def test_truncated_payload_inside_valid_gzip(tmp_path):
    tiny_mnist(tmp_path, n=3)
    write_idx(tmp_path / TEST_IMAGES, 2051, (3, 28, 28), bytes(2 * 28 * 28 + 5))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_mnist(tmp_path, verify=False)


def test_bad_magic(tmp_path):
    tiny_mnist(tmp_path, n=2)
    write_idx(tmp_path / TEST_LABELS, 2051, (2,), bytes(2))  # images magic on a labels file
    with pytest.raises(ValueError, match="bad IDX magic") as info:
        load_mnist(tmp_path, verify=False)
    assert TEST_LABELS in str(info.value)


def test_not_gzip(tmp_path):
    tiny_mnist(tmp_path, n=2)
    write_idx(tmp_path / TEST_IMAGES, 2051, (2, 28, 28), bytes(2 * 784), compress=False)
    with pytest.raises(ValueError, match="not a complete gzip file"):
        load_mnist(tmp_path, verify=False)


def test_count_mismatch_and_bad_labels(tmp_path):
    tiny_mnist(tmp_path, n=3)
    write_idx(tmp_path / TEST_LABELS, 2049, (2,), bytes(2))
    with pytest.raises(ValueError, match="3 images but .* 2 labels"):
        load_mnist(tmp_path, verify=False)
    write_idx(tmp_path / TEST_LABELS, 2049, (3,), bytes([1, 2, 11]))
    with pytest.raises(ValueError, match="label 11"):
        load_mnist(tmp_path, verify=False)


def test_synthetic_idx_round_trip(tmp_path):
    images, labels = tiny_mnist(tmp_path, n=4, prefix="train")
    x, y = load_mnist(tmp_path, split="train", normalize=False, flatten=False, verify=False)
    assert torch.equal((x * 255).round().to(torch.uint8).squeeze(1), images)
    assert torch.equal(y, labels.long())


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"split": "val"}, ValueError, "split"),
    ({"limit": 0}, ValueError, "limit"),
    ({"limit": 2.5}, ValueError, "limit"),
    ({"dtype": torch.uint8}, TypeError, "dtype"),
])
def test_bad_arguments(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_mnist(tmp_path, **kwargs)


def test_folder_none():
    with pytest.raises(ValueError, match="folder"):
        load_mnist(None)
