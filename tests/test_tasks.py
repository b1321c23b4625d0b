"""Built-in tasks: data shapes, model shapes, losses, targets and the registry's errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import natgrad.optim
from natgrad.tasks import TASKS, get_task

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="MNIST t10k files not found in ../shared/data/mnist")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _check(name, n_train, n_test, x_shape, out_dim, params, mnist_dir=None):
    task = get_task(name)
    data = task.load(mnist_dir)
    assert data.x_train.shape == (n_train, *x_shape) and data.x_test.shape == (n_test, *x_shape)
    assert data.x_train.dtype == torch.float32
    model = task.make_model()
    assert _params(model) == params
    out = model(data.x_train[:7])
    assert out.shape == (7, out_dim)
    loss = task.loss(out, data.y_train[:7])
    assert loss.dim() == 0 and torch.isfinite(loss)
    return task, data, model


def test_digits_mlp():
    task, data, model = _check("digits-mlp", 1437, 360, (64,), 10, 64 * 32 + 32 + 32 * 10 + 10)
    assert task.target_loss == 0.05 and task.batch_size == 128 and task.likelihood == "categorical"
    assert data.y_train.dtype == torch.long and set(data.y_train.tolist()) == set(range(10))
    assert isinstance(model[1], torch.nn.Tanh)
    assert "accuracy" in task.metric_sums(model(data.x_test), data.y_test)


def test_mnist1d_tasks():
    _, data, _ = _check("mnist1d-mlp", 4000, 1000, (40,), 10, 15210)
    assert abs(float(data.x_train.mean())) < 0.05 and data.y_test.shape == (1000,)
    task, _, model = _check("mnist1d-cnn", 4000, 1000, (40,), 10, 5210)
    assert task.target_loss == 0.1 and get_task("mnist1d-mlp").target_loss == 0.1
    assert all(isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] == 1 for m in (model.conv1, model.conv2, model.conv3))


def test_mnist1d_cnn_matches_conv1d():
    """The Conv2d-(1,k) model computes the notebook's Conv1d network."""
    model = get_task("mnist1d-cnn").make_model()
    x = torch.randn(3, 40)
    h = x.unsqueeze(1)
    for conv, k in ((model.conv1, 5), (model.conv2, 3), (model.conv3, 3)):
        h = torch.relu(torch.nn.functional.conv1d(h, conv.weight.squeeze(2), conv.bias, stride=2, padding=1))
    torch.testing.assert_close(model(x), model.fc(h.flatten(1)))


@needs_mnist
def test_mnist_classifiers():
    _check("mnist-mlp", 8000, 2000, (784,), 10, 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10, MNIST_DIR)
    task, data, _ = _check("mnist-cnn", 8000, 2000, (1, 28, 28), 10, 18378, MNIST_DIR)
    assert "8000 train / 2000 test" in data.note
    # the split is disjoint and fixed
    again = task.load(MNIST_DIR)
    assert torch.equal(again.y_test, data.y_test)


@needs_mnist
def test_mnist_autoencoder():
    widths = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    task, data, model = _check("mnist-autoencoder", 8000, 2000, (784,), 784, params, MNIST_DIR)
    assert task.likelihood == "bernoulli" and not task.classifier
    assert torch.equal(data.y_train, data.x_train) and 0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1
    linear = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == widths[1:]
    kinds = [type(m).__name__ for m in model]
    code = kinds.index("Linear", kinds.index("Linear", kinds.index("Linear", kinds.index("Linear") + 1) + 1) + 1)
    assert kinds[code + 1] == "Linear"  # the 30-unit code is linear
    assert kinds.count("Sigmoid") == 6
    out = model(data.x_train[:4])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out, data.x_train[:4], reduction="sum") / 4
    torch.testing.assert_close(task.loss(out, data.x_train[:4]), expected)
    assert set(task.metric_sums(out, data.x_train[:4])) == {"reconstruction_error"}


@pytest.mark.parametrize("name", ["digits-mlp", "mnist1d-cnn"])
def test_kfac_applies_to_every_layer(name):
    model = get_task(name).make_model()
    opt = natgrad.optim.KFAC(model, likelihood=get_task(name).likelihood)
    assert len(opt.adapters) == len(opt.blocks)


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown task 'nope'.*digits-mlp.*mnist-autoencoder"):
        get_task("nope")


def test_missing_mnist_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST"):
        get_task("mnist-mlp").load(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        get_task("mnist-mlp").load(tmp_path)


def test_targets_are_documented():
    for task in TASKS.values():
        assert task.target_loss > 0 and task.target_note and task.eval_every >= 1
