"""The quadratic model on rows of the batch (StepPolicy(quadratic_fraction=τ₂), Martens & Grosse
§6.4), checked in float64 against the brute-force exact Fisher of exactly those rows.

With S = max(⌈τ₂ N⌉, quadratic_min_examples) < N the model is M(δ) = ½ δᵀ(F_S + λI)δ + ∇ᵀδ:
F_S the exact Fisher of the S rows from j·S (mod N) at step j, ∇ the whole batch's gradient.
J·v on the rows come either from re-running the model on them (torch.func, for large models) or
from the batch's graph; both paths are forced here through the cost threshold and must give the
brute-force model's step. A replay that does not reproduce the batch (dropout) warns, leaves the
RNG and buffers alone, and takes the rows from the graph.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref
from test_optim_helpers import DT, data, factored_direction, flat_params, grad_of, mlp, nll, optim


def force_replay(monkeypatch, replay: bool) -> list:
    """Make every model (in)eligible for the replay; returns the list of replayed row counts."""
    import natgrad.optim.quadratic_rows as Q
    import natgrad.optim.step_rules as SR

    monkeypatch.setattr(SR, "REPLAY_DISPATCH_MACS", -1.0 if replay else float("inf"))
    calls = []
    original = Q.ReplayedRows.jvps

    def spy(self, vectors):
        calls.append(self.inputs.shape[0])
        return original(self, vectors)

    monkeypatch.setattr(Q.ReplayedRows, "jvps", spy)
    return calls


def expected_change(model, x, y, rows, lam, previous, likelihood):
    """θ_before − θ_after: δ = c₁(−Δ) + c₂δ₀ minimising the model with F of ``rows`` (Δ: K-FAC's
    direction from whole-batch exact factors, as Schedule(decay=0) gives)."""
    F = ref.fisher_exact(model, x[rows], likelihood)
    grad = grad_of(model, x, y, likelihood)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, likelihood, "exact"), lam)
    vecs = [-direction] + ([previous] if previous is not None else [])
    damped = F + lam * torch.eye(F.shape[0], dtype=DT)
    system = torch.tensor([[float(u @ damped @ v) for v in vecs] for u in vecs], dtype=DT)
    coeff = -torch.linalg.solve(system, torch.tensor([float(grad @ v) for v in vecs], dtype=DT))
    return -sum(c * v for c, v in zip(coeff, vecs))


def kfac_on_rows(model, lam, fraction, minimum=1, likelihood="categorical"):
    O = optim()
    return O.KFAC(model, likelihood=likelihood, estimator="exact", damping=lam,
                  schedule=O.Schedule(decay=0.0),
                  step_policy=O.StepPolicy(kl_clip=1e10, quadratic_fraction=fraction, quadratic_min_examples=minimum))


class TwoArguments(nn.Module):
    """An MLP whose forward takes a second (keyword) argument: not replayable."""

    def __init__(self, seed):
        super().__init__()
        self.net = mlp(seed)

    def forward(self, x, scale=1.0):
        return self.net(x) * scale


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("path", ["replay", "graph", "two-argument forward"])
def test_steps_minimise_the_model_of_rotating_rows(monkeypatch, path, likelihood):
    """Full-batch training on N = 10 with S = 4: steps use rows 0-3, 4-7, then 8, 9, 0, 1."""
    replayed = force_replay(monkeypatch, path != "graph")
    model = TwoArguments(21) if path == "two-argument forward" else mlp(21)
    x, y = data(model, 10, seed=5, likelihood=likelihood)
    lam = 0.03
    opt = kfac_on_rows(model, lam, fraction=0.4, likelihood=likelihood)
    previous = None
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]):
        expected = expected_change(model, x, y, rows, lam, previous, likelihood)
        before = flat_params(model)
        opt.zero_grad()
        out = model(x, scale=1.0) if path == "two-argument forward" else model(x)
        opt.backward(nll(out, y, likelihood), out)
        opt.step()
        change = before - flat_params(model)
        H.assert_rel_close(change, expected, 1e-8, f"step on rows {rows} ({path}, {likelihood})")
        previous = -change
    assert replayed == ([4, 4, 4] if path == "replay" else [])


def test_minimum_rows_and_small_batches():
    """S = max(⌈τ₂ N⌉, minimum); a batch of at most S rows uses all of them."""
    lam = 0.02
    for fraction, minimum, rows in ((0.25, 5, range(5)), (0.25, 12, range(12)), (0.5, 2, range(6))):
        model = mlp(22)
        x, y = data(model, 12, seed=6)
        expected = expected_change(model, x, y, list(rows), lam, None, "categorical")
        opt = kfac_on_rows(model, lam, fraction, minimum)
        before = flat_params(model)
        opt.zero_grad()
        out = model(x)
        opt.backward(nll(out, y), out)
        opt.step()
        H.assert_rel_close(before - flat_params(model), expected, 1e-8, f"τ₂={fraction}, minimum {minimum}")


NOISY = {  # rows that depend on randomness; on the rest of the batch (updating a buffer in place)
    "dropout": (lambda: nn.Dropout(0.5), "differs from the batch's"),
    "batchnorm": (lambda: nn.BatchNorm1d(6), "could not be re-run"),
}


def noisy(kind):
    torch.manual_seed(23)
    return nn.Sequential(nn.Linear(5, 6), NOISY[kind][0](), nn.Tanh(), nn.Linear(6, 3)).to(DT)


@pytest.mark.parametrize("kind", list(NOISY))
def test_a_replay_that_does_not_reproduce_the_batch_warns_and_leaves_rng_and_buffers_alone(monkeypatch, kind):
    replayed = force_replay(monkeypatch, True)
    x, y = data(noisy(kind), 16, seed=7)
    message = NOISY[kind][1]

    def run(fraction, steps):
        model = noisy(kind)
        opt = kfac_on_rows(model, 0.05, fraction)
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                opt.zero_grad()
                out = model(x)
                opt.backward(nll(out, y), out)
                opt.step()
        messages = [str(w.message) for w in caught if message in str(w.message)]
        return model, messages, torch.get_rng_state()

    model, mismatches, rng = run(0.25, 1)
    twin, none, twin_rng = run(1.0, 1)  # the whole batch, no replay: the same random draws and buffers
    assert replayed == [4] and len(mismatches) == 1 and not none
    assert "batch's graph" in mismatches[0]
    assert torch.equal(rng, twin_rng), "the replay consumed random numbers"
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), f"buffer {name} changed by the replay"
    replayed.clear()
    _, mismatches, _ = run(0.25, 3)
    assert replayed == [4] and len(mismatches) == 1  # warned once, then no replay


def test_replay_under_autocast_reproduces_the_batch(monkeypatch):
    """The replay runs under the autocast dtype the user's forward ran under (bfloat16 on CPU):
    no mismatch, and J·v are replayed."""
    replayed = force_replay(monkeypatch, True)
    O = optim()
    torch.manual_seed(24)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 10))
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    opt = O.KFAC(model, step_policy=O.StepPolicy(quadratic_fraction=0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out.float(), y)
            opt.backward(loss, out)
            opt.step()
    assert replayed == [32, 32, 32]  # max(⌈64/4⌉, 32)


@pytest.mark.parametrize("field, value", [
    ("quadratic_fraction", 0.0), ("quadratic_fraction", 1.5), ("quadratic_fraction", float("nan")),
    ("quadratic_fraction", "1/4"), ("quadratic_min_examples", 0), ("quadratic_min_examples", 2.0),
    ("quadratic_min_examples", True),
])
def test_bad_row_options_are_refused(field, value):
    O = optim()
    with pytest.raises(ValueError, match=f"StepPolicy.{field}"):
        O.StepPolicy(**{field: value})


def test_default_is_the_whole_batch():
    O = optim()
    assert O.StepPolicy().quadratic_fraction == 1.0
