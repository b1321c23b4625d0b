"""``natgrad.report``: how far each Fisher structure is from the exact Fisher, per layer.

A small tanh MLP is trained briefly with Adam (so the Fisher is not the one at
initialisation), the dense Fisher of the requested estimator is computed on ``examples``
training examples, and every structure is compared to it layer by layer (``F.blocks``):

* ``rel_error``: ``||F_s[b, b] - F[b, b]||_F / ||F[b, b]||_F`` on each layer's diagonal
  block, and on the whole matrix for the row ``"all"``;
* ``cosine``: cosine between the structure's natural gradient ``(F_s + damping I)^-1 g``
  and the exact one ``(F + damping I)^-1 g``, on each layer's slice and on the whole
  vector; ``g`` is the gradient of the mean cross-entropy on the same examples.

Every Fisher is computed from the same random state, so with ``estimator="mc"`` all the
structures see the same sampled labels and differ from the reference by their structure
only.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict

import torch
from torch import nn

from .report_result import _ALL, Report, write_json_atomic

__all__ = ["report", "Report", "write_json_atomic", "STRUCTURES", "ESTIMATORS",
           "DEFAULT_STRUCTURES"]

STRUCTURES = ("dense", "block_diagonal", "diagonal", "kron_sum", "kfac", "ekfac", "implicit")
ESTIMATORS = ("exact", "mc", "empirical")
DEFAULT_STRUCTURES = ("block_diagonal", "kron_sum", "kfac", "ekfac", "diagonal")
DATASETS = ("digits", "mnist")
DEFAULT_EXAMPLES = 512
_DEFAULT_HIDDEN = {"digits": (32,), "mnist": (8,)}


def report(model: nn.Module | None = None, data="digits", mnist_dir=None,
           estimator: str = "exact", samples: int = 1, damping: float = 1e-3,
           structures=DEFAULT_STRUCTURES, train_steps: int | None = None,
           hidden=None, examples: int | None = None, seed: int = 0,
           dtype: torch.dtype = torch.float64, lr: float = 1e-2, batch_size: int = 128,
           max_params: int = 10_000, progress: bool = True) -> Report:
    """Compare Fisher structures with the exact (dense) Fisher, per layer. See the module doc.

    ``data``: ``"digits"`` (scikit-learn's 8x8 digits, the default), ``"mnist"`` (test split
    read from ``mnist_dir``; a 784-``hidden``-10 MLP) or an ``(inputs, targets)`` pair of
    tensors (then ``model`` is required). ``model``: if given it is deep-copied (and moved
    to ``dtype``), never modified. ``train_steps``: Adam steps on mini-batches before
    measuring; default 200 for the built MLP and 0 for a given model. ``hidden``: widths of
    the built MLP's tanh hidden layers, default ``(32,)`` on digits and ``(8,)`` on MNIST
    (the dense reference is ``P x P``; ``max_params`` guards it). ``examples``: how many
    training examples the Fisher is computed on, default all of them up to 512. Reproducible
    for a given ``seed`` without touching the global random state.
    """
    import natgrad  # the core (imported here: natgrad/__init__.py imports this module)

    structures = _check_args(model, data, estimator, samples, damping, structures,
                             train_steps, examples, dtype, lr, batch_size, max_params)
    x_train, y_train, x_test, y_test, data_name = _load(data, mnist_dir, dtype, seed)
    if examples is None:
        examples = min(DEFAULT_EXAMPLES, x_train.shape[0])
    elif examples > x_train.shape[0]:
        raise ValueError(f"examples={examples} but the training data has only "
                         f"{x_train.shape[0]} examples")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model is None:
            hidden = _check_hidden(_DEFAULT_HIDDEN[data_name] if hidden is None else hidden)
            net = mlp(x_train.shape[1], hidden, int(y_train.max()) + 1).to(dtype)
            steps = 200 if train_steps is None else train_steps
        else:
            if hidden is not None:
                raise ValueError("hidden only applies to the built MLP; do not pass it "
                                 "together with a model")
            net = copy.deepcopy(model).to(dtype)
            steps = 0 if train_steps is None else train_steps
        params = [p for p in net.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        device = params[0].device
        x_train, y_train = x_train.to(device), y_train.to(device)
        if x_test is not None:
            x_test, y_test = x_test.to(device), y_test.to(device)
        n_params = sum(p.numel() for p in params)
        if n_params > max_params:
            raise ValueError(
                f"the model has {n_params:,} trainable parameters; the dense reference "
                f"Fisher would be {n_params:,}^2 ({8 * n_params ** 2 / 2 ** 30:.1f} GiB in "
                f"float64). Use a smaller model (e.g. hidden=(8,)) or raise max_params")
        t0 = time.perf_counter()
        train_loss = _train(net, x_train, y_train, steps, lr, batch_size, progress)
        train_seconds = time.perf_counter() - t0

        x, y = x_train[:examples], y_train[:examples]
        grad = _mean_gradient(net, x, y, params)
        fisher_seed = seed + 1  # same sampled labels for every structure ("mc")
        t0 = time.perf_counter()
        torch.manual_seed(fisher_seed)
        reference = natgrad.fisher(net, (x, y), likelihood="categorical", estimator=estimator,
                                   structure="dense", samples=samples)
        ref_dense = reference.to_dense()
        ref_ng = reference.solve(grad, damping)
        timings = {"dense": time.perf_counter() - t0}
        blocks = tuple(reference.blocks)
        layers = tuple(b.name for b in blocks) + (_ALL,)
        rel_error: dict[str, dict[str, float]] = {}
        cosine: dict[str, dict[str, float]] = {}
        for structure in structures:
            t0 = time.perf_counter()
            torch.manual_seed(fisher_seed)
            fs = natgrad.fisher(net, (x, y), likelihood="categorical", estimator=estimator,
                                structure=structure, samples=samples)
            dense = fs.to_dense()
            ng = fs.solve(grad, damping)
            timings[structure] = time.perf_counter() - t0
            if tuple(fs.blocks) != blocks:
                raise RuntimeError(f"natgrad bug: structure {structure!r} has blocks "
                                   f"{fs.blocks}, the dense Fisher {blocks}")
            errs, coss = {}, {}
            for b in blocks:
                errs[b.name] = _rel_error(dense[b.slice, b.slice], ref_dense[b.slice, b.slice])
                coss[b.name] = _cosine(ng[b.slice], ref_ng[b.slice])
            errs[_ALL] = _rel_error(dense, ref_dense)
            coss[_ALL] = _cosine(ng, ref_ng)
            rel_error[structure], cosine[structure] = errs, coss
            del dense

        with torch.no_grad():
            test_acc = (net(x_test).argmax(1) == y_test).double().mean().item() \
                if x_test is not None else float("nan")
    metadata = {
        "data": data_name, "model": _describe_model(net, model is None), "params": n_params,
        "blocks": [{"name": b.name, "params": list(b.params), "start": b.start,
                    "stop": b.stop} for b in blocks],
        "estimator": estimator, "samples": samples, "damping": damping,
        "examples": examples, "seed": seed, "dtype": str(dtype).replace("torch.", ""),
        "train_steps": steps, "lr": lr, "batch_size": batch_size,
        "train_loss": train_loss, "test_accuracy": test_acc,
        "train_seconds": train_seconds, "fisher_seconds": timings,
        "torch": torch.__version__, "natgrad": getattr(natgrad, "__version__", None),
    }
    return Report(structures, layers, rel_error, cosine, metadata)


def mlp(n_in: int, hidden, n_out: int) -> nn.Sequential:
    """``Linear-Tanh-...-Linear`` with layers named ``fc1, fc2, ...`` (the block names)."""
    mods: "OrderedDict[str, nn.Module]" = OrderedDict()
    widths = [n_in, *hidden]
    for i in range(len(hidden)):
        mods[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
        mods[f"tanh{i + 1}"] = nn.Tanh()
    mods[f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], n_out)
    return nn.Sequential(mods)


# --------------------------------------------------------------------------- helpers

def _check_args(model, data, estimator, samples, damping, structures, train_steps, examples,
                dtype, lr, batch_size, max_params) -> tuple[str, ...]:
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    if isinstance(data, str):
        if data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS} or an (inputs, targets) pair, "
                             f"got {data!r}")
    elif isinstance(data, (tuple, list)) and len(data) == 2 \
            and all(isinstance(t, torch.Tensor) for t in data):
        if model is None:
            raise ValueError("with data given as tensors, pass the model too")
    else:
        raise TypeError(f"data must be 'digits', 'mnist' or an (inputs, targets) pair of "
                        f"tensors, got {type(data).__name__}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    _positive_int("samples", samples)
    if samples != 1 and estimator != "mc":
        raise ValueError(f"samples={samples} only applies to estimator='mc' "
                         f"(the {estimator} Fisher draws no labels)")
    if examples is not None:
        _positive_int("examples", examples)
    _positive_int("batch_size", batch_size)
    _positive_int("max_params", max_params)
    if train_steps is not None:
        _positive_int("train_steps", train_steps, allow_zero=True)
    for name, value in (("damping", damping), ("lr", lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if isinstance(structures, str):
        structures = (structures,)
    structures = tuple(structures)
    if not structures:
        raise ValueError("structures is empty")
    for s in structures:
        if s not in STRUCTURES:
            raise ValueError(f"unknown structure {s!r}; choose from {STRUCTURES}")
    if len(set(structures)) != len(structures):
        raise ValueError(f"structures has duplicates: {structures}")
    return structures


def _positive_int(name, value, allow_zero=False):
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_hidden(hidden) -> tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        hidden = tuple(hidden)
    except TypeError:
        raise TypeError(f"hidden must be a sequence of layer widths, got {hidden!r}") from None
    for h in hidden:
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"hidden layer widths must be ints >= 1, got {hidden!r}")
    return hidden


def _load(data, mnist_dir, dtype, seed):
    from . import datasets

    if isinstance(data, str) and data == "digits":
        if mnist_dir is not None:
            raise ValueError("mnist_dir is only used with data='mnist'")
        x_tr, y_tr, x_te, y_te = datasets.load_digits(seed=seed, dtype=dtype)
        return x_tr, y_tr, x_te, y_te, "digits"
    if isinstance(data, str) and data == "mnist":
        if mnist_dir is None:
            raise ValueError("data='mnist' needs mnist_dir, the folder holding "
                             "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
        x, y = datasets.load_mnist(mnist_dir, split="test", dtype=dtype)
        # The test split is the one shipped everywhere; hold out a fixed 2,000 for accuracy.
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
        x, y = x[perm], y[perm]
        return x[2000:], y[2000:], x[:2000], y[:2000], "mnist"
    inputs, targets = data
    if inputs.shape[:1] != targets.shape[:1]:
        raise ValueError(f"inputs and targets disagree on the number of examples: "
                         f"{inputs.shape[0]} vs {targets.shape[0]}")
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    return inputs, targets.long(), None, None, "tensors"


def _train(net, x, y, steps, lr, batch_size, progress) -> float:
    if steps == 0:
        with torch.no_grad():
            return nn.functional.cross_entropy(net(x), y).item()
    from tqdm import tqdm

    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    # Tiny mini-batch steps: one thread is faster, and much faster when the cores are busy
    # (multi-threaded small ops spin-wait on each other). Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_steps(net, opt, x, y, steps, batch_size, progress, tqdm)
    finally:
        torch.set_num_threads(threads)


def _train_steps(net, opt, x, y, steps, batch_size, progress, tqdm) -> float:
    n = x.shape[0]
    batch_size = min(batch_size, n)
    order = torch.randperm(n)
    pos = 0
    loss_value = float("nan")
    bar = tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=False)
    for _ in bar:
        if pos + batch_size > n:
            order, pos = torch.randperm(n), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    with torch.no_grad():
        return nn.functional.cross_entropy(net(x), y).item()


def _mean_gradient(net, x, y, params) -> torch.Tensor:
    loss = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads]).detach()


def _rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    denom = torch.linalg.matrix_norm(exact).item()
    if denom == 0.0:
        return float("nan")
    return torch.linalg.matrix_norm(approx - exact).item() / denom


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return (torch.dot(a, b).item() / na) / nb


def _describe_model(net: nn.Module, built: bool) -> str:
    if built:
        widths = [m.in_features for m in net if isinstance(m, nn.Linear)]
        widths.append(net[-1].out_features)
        return "MLP " + "-".join(map(str, widths)) + " tanh"
    return type(net).__name__
