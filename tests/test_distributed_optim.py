"""KFAC, EKFAC and NGD on 2 and 3 gloo processes: R ranks × batch B step exactly as one
process × batch R·B (float64, deterministic estimators), sharded inverses step as replicated
ones, a resumed distributed run continues bit-for-bit, and bad set-ups fail clearly.

One spawn per world size runs every scenario (a module-scoped fixture); the single-process
runs happen in the test process. Each scenario returns the flat parameters after every step.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distributed_harness import run_ranks
from helpers import DT, cnn, mlp
import reference as ref
from test_optim_helpers import factored_direction, grad_of

GLOBAL_BATCH = 12  # divisible by 2 and 3
STEPS = 4
SUBSET_ROWS = 6  # stat_min_examples of the statistics-subset scenario: divisible by 2 and 3
QUADRATIC_DAMPING = 0.03
# Two float64 computations of the same sums in a different order differ by ~1e-16 relative;
# four optimizer steps (Cholesky, eigh, solves with damping ≥ 1e-3) amplify that by well
# under 10^4. 1e-9 catches any missing rank, wrong normalisation or unreduced sum (O(1)).
RTOL = 1e-9
# NGD's implicit structure stops CG at a relative residual of 1e-10 (float64 default); the
# iterates of two runs agree to about that.
CG_RTOL = 1e-7


def batches(model_kind: str, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    shape = (GLOBAL_BATCH, 5) if model_kind == "mlp" else (GLOBAL_BATCH, 2, 5, 5)
    return [
        (torch.randn(shape, generator=generator, dtype=DT), torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator))
        for _ in range(steps)
    ]


def make_model(kind: str) -> nn.Module:
    return mlp(seed=1, sizes=(5, 6, 3)) if kind == "mlp" else cnn(seed=1)


def make_optimizer(name: str, model: nn.Module, **options):
    from natgrad.optim import EKFAC, KFAC, NGD, Schedule

    kind = {"kfac": KFAC, "ekfac": EKFAC, "ngd": NGD}[name]
    if name != "ngd":
        options.setdefault("schedule", Schedule(inverse_every=2))
    return kind(model, **options)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(opt, model, data, rank, world, plain_backward=False, closure=False, nan_rank=None):
    """The documented loop on this rank's contiguous slice of every global batch."""
    size = GLOBAL_BATCH // world
    trace = []
    for step, (x, y) in enumerate(data):
        x, y = x[rank * size : (rank + 1) * size], y[rank * size : (rank + 1) * size]
        if nan_rank == rank and step == 1:
            x = x * float("nan")
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        if plain_backward:
            loss.backward()
        else:
            opt.backward(loss, out)
        if closure:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.step()
        trace.append(flat(model))
    return torch.stack(trace)


# scenario name -> (model kind, optimizer, options, loop options)
SCENARIOS = {
    "kfac-exact": ("mlp", "kfac", {"estimator": "exact"}, {}),
    "kfac-exact-gradients": ("mlp", "kfac", {"estimator": "exact", "sharding": "gradients"}, {}),
    "kfac-exact-replicated": ("mlp", "kfac", {"estimator": "exact", "sharding": "replicated"}, {}),
    "kfac-empirical-plain": ("mlp", "kfac", {"estimator": "empirical"}, {"plain_backward": True}),
    "kfac-eigen-adaptive": ("mlp", "kfac", {"estimator": "exact", "eigen_adaptive": True}, {"closure": True}),
    "kfac-cnn": ("cnn", "kfac", {"estimator": "exact"}, {}),
    "ekfac-exact": ("mlp", "ekfac", {"estimator": "exact"}, {}),
    "ekfac-empirical": ("mlp", "ekfac", {"estimator": "empirical"}, {}),
    "ekfac-cnn": ("cnn", "ekfac", {"estimator": "exact"}, {}),
    "ngd-dense-exact": ("mlp", "ngd", {"estimator": "exact", "structure": "dense"}, {}),
    "ngd-blocks-empirical": ("mlp", "ngd", {"estimator": "empirical", "structure": "block_diagonal"}, {}),
    "ngd-kron-sum": ("mlp", "ngd", {"estimator": "exact", "structure": "kron_sum"}, {}),
    "ngd-implicit": ("mlp", "ngd", {"estimator": "exact", "structure": "implicit"}, {}),
}


def _options(options: dict) -> dict:
    options = dict(options)
    if options.pop("eigen_adaptive", False):
        from natgrad.optim import DampingPolicy

        options["damping_policy"] = DampingPolicy(mode="eigen", adaptive=True, adapt_every=1)
    return options


def scenario(name: str, rank: int, world: int, wrap: bool) -> torch.Tensor:
    kind, optimizer, options, loop = SCENARIOS[name]
    model = make_model(kind)
    target = nn.parallel.DistributedDataParallel(model) if wrap else model
    opt = make_optimizer(optimizer, target if rank % 2 == 0 else model, **_options(options))
    try:
        return train(opt, target, batches(kind), rank, world, **loop)
    finally:
        opt.remove_hooks()


# ------------------------------------------------------------------ what each rank runs
def fixed_buckets(model: nn.Module) -> nn.Module:
    """DDP whose gradient buckets keep their first layout. DDP otherwise re-orders them after its
    first iteration, and with 3+ ranks a sum's rounding depends on where a value sits in the
    bucket: a resumed run's first step would differ from the uninterrupted one's by ~1e-17.
    ``find_unused_parameters=True`` disables the re-ordering (natgrad train does the same)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)


def resume_scenario(rank: int, world: int) -> dict:
    """2 steps, checkpoint (state_dict is collective with sharded gradients), 2 more; then a fresh
    model and optimizer resume from the checkpoint and take the same 2 steps."""
    data = batches("mlp")
    options = {"estimator": "mc", "sharding": "gradients"}
    torch.manual_seed(100 + rank)  # mc draws differ per rank
    model = make_model("mlp")
    ddp = fixed_buckets(model)
    opt = make_optimizer("kfac", ddp, **options)
    train(opt, ddp, data[:2], rank, world)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    straight = train(opt, ddp, data[2:], rank, world)
    opt.remove_hooks()

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model = make_model("mlp")
    model.load_state_dict(checkpoint["model"])
    ddp = fixed_buckets(model)
    opt = make_optimizer("kfac", ddp, **options)
    opt.load_state_dict(checkpoint["opt"])
    torch.set_rng_state(checkpoint["rng"])
    resumed = train(opt, ddp, data[2:], rank, world)
    opt.remove_hooks()
    return {"straight": straight, "resumed": resumed}


def factors_scenario(rank: int, world: int, **options) -> dict:
    """Reduced K-FAC factors after one empirical statistics step, and the inputs of each layer."""
    model = make_model("mlp")
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer("kfac", ddp, estimator="empirical", **options)
    train(opt, ddp, batches("mlp")[:1], rank, world, plain_backward=True)
    state = {name: {k: opt.state[module.weight][k].clone() for k in ("A", "G")}
             for name, module in (("0", model[0]), ("2", model[2]))}
    opt.remove_hooks()
    return state


def quadratic_rows_scenario(rank: int, world: int) -> dict:
    """θ_before − θ_after of one exact K-FAC step whose quadratic model takes ⌈6/R⌉ rows of each
    rank's slice (τ₂ N/R is fewer), with J·v from the graph and replayed under torch.func."""
    import natgrad.optim.step_rules as SR
    from natgrad.optim import Schedule, StepPolicy

    policy = StepPolicy(kl_clip=1e10, quadratic_fraction=1 / 8, quadratic_min_examples=SUBSET_ROWS)
    changes, threshold = {}, SR.REPLAY_DISPATCH_MACS
    try:
        for path, cost in (("graph", float("inf")), ("replay", -1.0)):
            SR.REPLAY_DISPATCH_MACS = cost
            model = make_model("mlp")
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = make_optimizer("kfac", ddp, estimator="exact", damping=QUADRATIC_DAMPING,
                                 schedule=Schedule(decay=0.0), step_policy=policy)
            before = flat(model)
            train(opt, ddp, batches("mlp")[:1], rank, world)
            changes[path] = before - flat(model)
            opt.remove_hooks()
    finally:
        SR.REPLAY_DISPATCH_MACS = threshold
    return changes


def failures_scenario(rank: int, world: int) -> dict:
    out = {}
    # different parameters on the ranks, model not wrapped: caught at construction
    model = mlp(seed=rank, sizes=(5, 6, 3))
    try:
        make_optimizer("kfac", model, estimator="exact")
    except ValueError as error:
        out["mismatch"] = str(error)
    # different options on the ranks
    try:
        make_optimizer("kfac", make_model("mlp"), estimator="exact", damping=1e-3 * (1 + rank))
    except ValueError as error:
        out["options"] = str(error)
    # same model, not wrapped in DDP: gradients of different slices differ at the first step
    model = make_model("mlp")
    opt = make_optimizer("kfac", model, estimator="exact")
    try:
        train(opt, model, batches("mlp")[:1], rank, world)
    except ValueError as error:
        out["unwrapped"] = str(error)
    opt.remove_hooks()
    # a non-finite loss on one rank: every rank skips that step, nobody hangs
    model = make_model("mlp")
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer("kfac", ddp, estimator="exact")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["nan_trace"] = train(opt, ddp, batches("mlp")[:3], rank, world, nan_rank=world - 1)
    out["nan_steps"] = opt.steps
    opt.remove_hooks()
    out["bad_sharding"] = _error(lambda: make_optimizer("ekfac", make_model("mlp"), sharding="gradients"))
    out["bad_sharding_name"] = _error(lambda: make_optimizer("kfac", make_model("mlp"), sharding="layers"))
    return out


def stopped_rank_scenario(rank: int, world: int) -> str | None:
    """The last rank stops before its first step; the others must fail with a clear error."""
    from natgrad.distributed import DistributedError

    model = make_model("mlp")
    opt = make_optimizer("kfac", model, estimator="empirical")
    if rank == world - 1:
        return None
    try:
        train(opt, model, batches("mlp")[:1], rank, world, plain_backward=True)
    except DistributedError as error:
        return str(error)
    return "no error"


def _error(fn) -> str | None:
    try:
        fn()
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def everything(rank: int, world: int) -> dict:
    results = {"scenarios": {}}
    for name in SCENARIOS:
        results["scenarios"][name] = scenario(name, rank, world, wrap=True)
    results["resume"] = resume_scenario(rank, world)
    results["factors"] = factors_scenario(rank, world)
    from natgrad.optim import Schedule

    subset = Schedule(stat_fraction=1 / 8, stat_min_examples=SUBSET_ROWS)
    results["subset_factors"] = factors_scenario(rank, world, schedule=subset)
    results["quadratic_rows"] = quadratic_rows_scenario(rank, world)
    results["failures"] = failures_scenario(rank, world)
    return results


# ------------------------------------------------------------------ tests
@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def ranks(request):
    world = request.param
    return world, run_ranks(world, everything)


def single_process(name: str) -> torch.Tensor:
    kind, optimizer, options, loop = SCENARIOS[name]
    model = make_model(kind)
    opt = make_optimizer(optimizer, model, **_options(options))
    try:
        return train(opt, model, batches(kind), 0, 1, **loop)
    finally:
        opt.remove_hooks()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_step_as_one_process_on_the_union_batch(ranks, name):
    world, results = ranks
    traces = [r["scenarios"][name] for r in results]
    for trace in traces[1:]:
        assert torch.equal(trace, traces[0]), "ranks hold different parameters"
    expected = single_process(name)
    tol = CG_RTOL if "implicit" in name else RTOL
    scale = expected.abs().max()
    assert (traces[0] - expected).abs().max() <= tol * scale
    start = flat(make_model(SCENARIOS[name][0]))
    assert (expected[-1] - start).abs().max() > 1e-3 * scale, "the scenario must actually move the parameters"


def test_sharded_inverses_step_exactly_as_replicated(ranks):
    _, results = ranks
    for r in results:
        replicated = r["scenarios"]["kfac-exact-replicated"]
        assert torch.equal(r["scenarios"]["kfac-exact"], replicated)
        assert torch.equal(r["scenarios"]["kfac-exact-gradients"], replicated)


def test_resumed_distributed_run_continues_bit_for_bit(ranks):
    _, results = ranks
    for r in results:
        assert torch.equal(r["resume"]["straight"], r["resume"]["resumed"])
    assert torch.equal(results[0]["resume"]["straight"], results[-1]["resume"]["straight"])


def _plain_factors(rows: list[int]) -> dict:
    """A = mean of [h;1][h;1]ᵀ and G = mean of g gᵀ (g = per-example ∂(−log p)/∂a) over the
    given examples of the first global batch, computed plainly with autograd."""
    model = make_model("mlp")
    x, y = batches("mlp")[0]
    x, y = x[rows], y[rows]
    a1 = x @ model[0].weight.T + model[0].bias
    a1.retain_grad()
    h1 = torch.tanh(a1)
    a2 = h1 @ model[2].weight.T + model[2].bias
    a2.retain_grad()
    F.cross_entropy(a2, y, reduction="sum").backward()
    ones = torch.ones(len(rows), 1, dtype=DT)
    expected = {}
    for name, h, a in (("0", x, a1), ("2", h1.detach(), a2)):
        hb = torch.cat([h, ones], 1)
        expected[name] = {"A": hb.T @ hb / len(rows), "G": a.grad.T @ a.grad / len(rows)}
    return expected


def _assert_factors(results, key, expected):
    for r in results:
        for name in expected:
            for factor in ("A", "G"):
                got = r[key][name][factor].squeeze(0)
                want = expected[name][factor]
                assert torch.allclose(got, want, rtol=0, atol=RTOL * want.abs().max()), (key, name, factor)


def test_reduced_factors_equal_plain_factors_of_the_union_batch(ranks):
    """The factors of all ranks' examples."""
    _, results = ranks
    _assert_factors(results, "factors", _plain_factors(list(range(GLOBAL_BATCH))))


def test_statistics_subsets_add_up_over_the_ranks(ranks):
    """Schedule(stat_fraction=1/8, stat_min_examples=6): each of R ranks takes ⌈6/R⌉ rows of its
    own slice (⌈τ₁ N/R⌉ = 1 is fewer), so the reduced factors are those of 6 examples in all: the
    first 3 of each half (2 ranks) or the first 2 of each third (3 ranks)."""
    world, results = ranks
    size, take = GLOBAL_BATCH // world, -(-SUBSET_ROWS // world)
    rows = [rank * size + i for rank in range(world) for i in range(take)]
    assert len(rows) == SUBSET_ROWS
    _assert_factors(results, "subset_factors", _plain_factors(rows))


def test_quadratic_model_rows_add_up_over_the_ranks(ranks):
    """StepPolicy(quadratic_fraction=1/8, quadratic_min_examples=6): the first ⌈6/R⌉ rows of each
    rank's slice make up the F of the first step's α* = ∇ᵀΔ / (ΔᵀF Δ + λΔᵀΔ) (brute force: ∇ and
    the factors of Δ from the whole global batch)."""
    world, results = ranks
    size, take = GLOBAL_BATCH // world, -(-SUBSET_ROWS // world)
    rows = [rank * size + i for rank in range(world) for i in range(take)]
    model = make_model("mlp")
    x, y = batches("mlp")[0]
    lam = QUADRATIC_DAMPING
    grad = grad_of(model, x, y)
    direction = factored_direction(model, grad, ref.kfac_factors(model, x, y, "categorical", "exact"), lam)
    F_rows = ref.fisher_exact(model, x[rows], "categorical")
    alpha = float(grad @ direction) / float(direction @ F_rows @ direction + lam * direction @ direction)
    for r in results:
        for path, change in r["quadratic_rows"].items():
            assert torch.allclose(change, alpha * direction, rtol=0, atol=RTOL * direction.abs().max() * alpha), path


def test_mismatched_models_and_options_fail_at_construction_on_every_rank(ranks):
    _, results = ranks
    for r in results:
        failures = r["failures"]
        assert "differ from rank 0" in failures["mismatch"]
        assert "differ from rank 0" in failures["options"]
        assert "DistributedDataParallel" in failures["unwrapped"]


def test_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ranks):
    _, results = ranks
    traces = [r["failures"]["nan_trace"] for r in results]
    for r, trace in zip(results, traces):
        assert r["failures"]["nan_steps"] == 2
        assert torch.equal(trace[1], trace[0])  # step 1 skipped
        assert torch.equal(trace, traces[0])


def test_bad_sharding_is_refused(ranks):
    _, results = ranks
    failures = results[0]["failures"]
    assert failures["bad_sharding"].startswith("ValueError") and "eigenbasis" in failures["bad_sharding"]
    assert failures["bad_sharding_name"].startswith("ValueError") and "sharding" in failures["bad_sharding_name"]


def test_a_stopped_rank_ends_the_others_with_a_clear_error():
    import time

    start = time.perf_counter()
    messages = run_ranks(2, stopped_rank_scenario, timeout=10.0)
    assert time.perf_counter() - start < 60
    assert messages[1] is None
    assert "rank 0/2" in messages[0] and "failed" in messages[0]
