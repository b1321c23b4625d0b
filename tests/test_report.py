"""natgrad.report: per-layer errors of each structure against the dense Fisher.

Small settings (a 64-16-10 MLP, 64 examples, a few Adam steps) keep this at a few seconds;
the checks are cases where the answer is known exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from natgrad.report import Report, mlp, report, write_json_atomic

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
SMALL = dict(hidden=(16,), examples=64, train_steps=20, progress=False)
ALL_STRUCTURES = ("dense", "block_diagonal", "kron_sum", "kfac", "ekfac", "diagonal")
LAYERS = ("fc1", "fc2")
EXACT = 1e-9  # float64 relative error of a structure that is exact


@pytest.fixture(scope="module")
def exact_report() -> Report:
    return report(structures=ALL_STRUCTURES, **SMALL)


def test_layout_and_metadata(exact_report):
    rep = exact_report
    assert rep.structures == ALL_STRUCTURES
    assert rep.layers == LAYERS + ("all",)
    meta = rep.metadata
    assert meta["data"] == "digits" and meta["params"] == 64 * 16 + 16 + 16 * 10 + 10
    assert meta["estimator"] == "exact" and meta["examples"] == 64 and meta["train_steps"] == 20
    assert [b["name"] for b in meta["blocks"]] == list(LAYERS)
    assert meta["blocks"][0]["params"] == ["fc1.weight", "fc1.bias"]
    assert meta["blocks"][-1]["stop"] == meta["params"]
    assert 0.5 < meta["test_accuracy"] <= 1.0  # trained a little, not at initialisation
    for s in rep.structures:
        for layer in rep.layers:
            assert math.isfinite(rep.rel_error[s][layer]) and rep.rel_error[s][layer] >= 0
            assert -1 - 1e-9 <= rep.cosine[s][layer] <= 1 + 1e-9


def test_dense_matches_itself(exact_report):
    for layer in exact_report.layers:
        assert exact_report.rel_error["dense"][layer] < EXACT
        assert exact_report.cosine["dense"][layer] > 1 - 1e-9


def test_block_diagonal_exact_blocks_but_not_whole(exact_report):
    err, cos = exact_report.rel_error["block_diagonal"], exact_report.cosine["block_diagonal"]
    for layer in LAYERS:
        assert err[layer] < EXACT
    assert err["all"] > 1e-3  # the off-diagonal blocks are dropped
    assert cos["all"] < 1 - 1e-6  # so the natural gradient differs
    assert cos["all"] > 0


def test_kron_sum_is_exact_per_layer(exact_report):
    err, cos = exact_report.rel_error, exact_report.cosine
    for layer in LAYERS:
        assert err["kron_sum"][layer] < EXACT
    # the same matrix as block_diagonal, so the same natural gradient
    assert err["kron_sum"]["all"] == pytest.approx(err["block_diagonal"]["all"], rel=1e-9)
    for layer in exact_report.layers:
        assert cos["kron_sum"][layer] == pytest.approx(cos["block_diagonal"][layer], abs=1e-7)


def test_kfac_ekfac_diagonal_are_approximations(exact_report):
    err = exact_report.rel_error
    for layer in LAYERS:
        for s in ("kfac", "ekfac", "diagonal"):
            assert 1e-6 < err[s][layer] < 1, (s, layer, err[s][layer])
        # EKFAC's scalings are the optimal diagonal in K-FAC's eigenbasis (Frobenius)
        assert err["ekfac"][layer] <= err["kfac"][layer] * (1 + 1e-9)


def test_kfac_exact_on_one_example():
    rep = report(structures=("kfac", "ekfac"), **{**SMALL, "examples": 1})
    for s in rep.structures:
        for layer in LAYERS:
            assert rep.rel_error[s][layer] < 1e-8, (s, layer)


@pytest.mark.parametrize("estimator, samples", [("mc", 2), ("empirical", 1)])
def test_other_estimators_use_the_same_samples(estimator, samples):
    rep = report(estimator=estimator, samples=samples, structures=("kron_sum", "kfac"), **SMALL)
    assert rep.metadata["estimator"] == estimator
    for layer in LAYERS:
        # exact per layer only if the structure saw the reference's sampled labels
        assert rep.rel_error["kron_sum"][layer] < EXACT, layer
        assert 0 < rep.rel_error["kfac"][layer] < 1


def test_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = report(structures=("kfac",), estimator="mc", **SMALL)
    assert torch.equal(state, torch.random.get_rng_state())
    b = report(structures=("kfac",), estimator="mc", **SMALL)
    assert a.rel_error == b.rel_error and a.cosine == b.cosine
    c = report(structures=("kfac",), estimator="mc", seed=1, **SMALL)
    assert c.rel_error != a.rel_error


def test_given_model_and_tensors_not_modified():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    rep = report(model=model, data=(x, y), structures=("kfac", "block_diagonal", "implicit"),
                 progress=False)  # default examples: all 40 (at most 512)
    assert rep.layers == ("0", "2", "all") and rep.metadata["examples"] == 40
    assert all(rep.rel_error["implicit"][layer] < EXACT for layer in rep.layers)  # matrix-free
    assert rep.metadata["train_steps"] == 0 and rep.metadata["data"] == "tensors"
    assert rep.metadata["test_accuracy"] is None or math.isnan(rep.metadata["test_accuracy"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    json.dumps(rep.to_dict(), allow_nan=False)  # NaN metadata becomes null
    # training a given model trains a copy
    report(model=model, data=(x, y), structures=("kfac",), examples=40, train_steps=3,
           progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_mnist_report():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST test files not found in {MNIST_DIR}")
    rep = report(data="mnist", mnist_dir=MNIST_DIR, hidden=(2,), examples=16, train_steps=5,
                 structures=("kron_sum", "kfac"), progress=False)
    assert rep.metadata["data"] == "mnist" and rep.metadata["params"] == 784 * 2 + 2 + 30
    assert rep.metadata["model"] == "MLP 784-2-10 tanh"
    for layer in LAYERS:
        assert rep.rel_error["kron_sum"][layer] < EXACT


def test_table_is_aligned(exact_report):
    table = exact_report.to_table()
    lines = table.splitlines()
    assert lines[0].startswith("natgrad report: digits, MLP 64-16-10 tanh")
    body = lines[1:]
    assert len({len(line) for line in body}) == 1, table  # every row has the same width
    for s in ALL_STRUCTURES:
        assert s in lines[1]
    assert "rel.err" in lines[2] and "cos" in lines[2]
    rows = [line.split()[0] for line in body[3:] if not line.startswith("-")]
    assert rows == ["fc1", "fc2", "all"]
    assert str(exact_report) == table
    assert exact_report.to_table(header=False) == "\n".join(body)


def test_to_dict_and_save(exact_report, tmp_path):
    path = exact_report.save(tmp_path / "sub" / "report.json")
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(exact_report.to_dict()))
    assert loaded["rel_error"]["kfac"]["fc1"] == exact_report.rel_error["kfac"]["fc1"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.json"]  # no temp left
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"structures": ("kfac", "bogus")}, ValueError, "unknown structure 'bogus'"),
    ({"structures": ()}, ValueError, "structures is empty"),
    ({"estimator": "fisher"}, ValueError, "estimator"),
    ({"examples": 100_000}, ValueError, "examples=100000"),
    ({"examples": 0}, ValueError, "examples"),
    ({"damping": 0.0}, ValueError, "damping"),
    ({"samples": 1.5}, ValueError, "samples"),
    ({"samples": 2}, ValueError, "only applies to estimator='mc'"),
    ({"hidden": (0,)}, ValueError, "hidden"),
    ({"data": "cifar"}, ValueError, "data must be one of"),
    ({"data": 3}, TypeError, "data must be"),
    ({"data": "mnist"}, ValueError, "mnist_dir"),
    ({"mnist_dir": "/tmp"}, ValueError, "mnist_dir"),
    ({"dtype": torch.int32}, TypeError, "dtype"),
    ({"model": "mlp"}, TypeError, "model"),
    ({"hidden": (400,), "max_params": 10_000}, ValueError, "trainable parameters"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        report(**{"train_steps": 0, "progress": False, **kwargs})


def test_data_tensors_need_model():
    with pytest.raises(ValueError, match="pass the model"):
        report(data=(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)))


def test_natgrad_report_is_the_function():
    # importing the submodule natgrad.report must not shadow the function natgrad.report
    import natgrad
    import natgrad.report  # noqa: F401

    assert callable(natgrad.report)
    rep = natgrad.report(structures=("kfac",), **{**SMALL, "train_steps": 0, "examples": 8})
    assert isinstance(rep, Report)


def test_mlp_names_layers():
    net = mlp(3, (4, 5), 2)
    assert [n for n, _ in net.named_children()] == ["fc1", "tanh1", "fc2", "tanh2", "fc3"]
