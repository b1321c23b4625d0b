"""natgrad.fisher(..., process_group=...): the Fisher of the union of all ranks' data.

Spawning gloo processes costs ~2 s, so each world size (2 and 3 ranks) is spawned once: the
module-level ``_scenarios`` runs every case on every rank and returns plain tensors (or the
errors raised), and the tests compare them in this process against the brute-force float64
reference (tests/reference.py) on the union of the ranks' data. The union is the same 9
examples for both world sizes, split unevenly and into unequal batches, so the references are
computed once.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

import helpers as H
import reference as ref
from distributed_harness import run_ranks

EPS = torch.finfo(torch.float64).eps
RTOL = 1e-10  # float64 sums of < 10^3 terms taken in another order
DAMPING = 0.1
# per rank, the sizes of its batches; 9 examples in all for every world size
SPLITS = {2: [[2, 3], [4]], 3: [[1], [3, 2], [3]]}
MODELS = {"mlp": lambda: H.mlp(3), "cnn": lambda: H.cnn(3)}
ESTIMATORS = ("exact", "empirical")
TOTAL = 9


def union_data(model_name):
    model = MODELS[model_name]()
    x, y = H.make_data(model, "categorical", TOTAL, seed=5)
    return model, x, y


def rank_batches(x, y, split, rank):
    start = sum(sum(sizes) for sizes in split[:rank])
    batches = []
    for size in split[rank]:
        batches.append((x[start : start + size], y[start : start + size]))
        start += size
    return batches


def fixed_vector(size, columns=None):
    g = torch.Generator().manual_seed(11)
    shape = (size,) if columns is None else (size, columns)
    return torch.randn(*shape, generator=g, dtype=H.DT)



def _error(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the type and message are what the test checks
        return type(error).__name__, str(error)
    return None


# --------------------------------------------------------------------------------------
# what every rank runs
# --------------------------------------------------------------------------------------
def _scenarios(rank, world):
    import natgrad
    from natgrad import distributed

    group = dist.group.WORLD
    split = SPLITS[world]
    out = {"union": {}}
    for model_name in MODELS:
        model, x, y = union_data(model_name)
        batches = rank_batches(x, y, split, rank)
        P = ref.num_params(model)
        g = fixed_vector(P)
        for estimator in ESTIMATORS:
            for structure in H.STRUCTURES:
                F = natgrad.fisher(model, batches, "categorical", estimator, structure, process_group=group)
                case = {"dense": F.to_dense(), "ng": natgrad.natural_gradient(F, g, DAMPING),
                        "examples": getattr(F, "examples", None)}
                if structure == "kfac":
                    case["factors"] = [(op.input_factor, op.output_factor) for op in F.operators]
                if structure == "implicit":
                    case["solve"] = F.solve(fixed_vector(P, 2), DAMPING)
                    if model_name == "mlp":  # each pushes the identity through P products
                        case["diagonal"], case["trace"] = F.diagonal(), F.trace()
                out["union"][model_name, estimator, structure] = case

    model, x, y = union_data("mlp")
    batches = rank_batches(x, y, split, rank)
    # a DDP-wrapped model is unwrapped (2 ranks only: wrapping imports torch._dynamo, ~2 s);
    # no process_group means this rank's data only
    if world == 2:
        wrapped = torch.nn.parallel.DistributedDataParallel(MODELS["mlp"]())
        out["ddp"] = natgrad.fisher(wrapped, batches, structure="dense", process_group=group).to_dense()
    out["local"] = natgrad.fisher(model, batches, structure="dense").to_dense()

    # mc: every rank draws with its own seed; the ranks still agree on one matrix
    torch.manual_seed(100 + rank)
    out["mc"] = natgrad.fisher(model, iter([b[0] for b in batches]), estimator="mc", samples=1000,
                               structure="diagonal", process_group=group).to_dense()

    # bytes handed to the collectives, per operation
    log = []
    original = distributed.Communicator._run

    def recording(self, what, op, tensor):
        original(self, what, op, tensor)
        log.append((what, tensor.numel() * tensor.element_size()))

    distributed.Communicator._run = recording
    try:
        cnn, cx, cy = union_data("cnn")
        natgrad.fisher(cnn, rank_batches(cx, cy, split, rank), structure="kfac", process_group=group)
        out["kfac_log"] = list(log)
        F = natgrad.fisher(model, batches, structure="implicit", process_group=group)
        del log[:]
        F.mv(fixed_vector(F.size, 3))
        out["product_log"] = list(log)
    finally:
        distributed.Communicator._run = original

    # errors: every rank must raise, none may hang
    last = world - 1
    bad = MODELS["mlp"]()
    if rank == last:
        with torch.no_grad():
            bad[0].weight[0, 0] += 1e-3
    out["bad_params"] = _error(lambda: natgrad.fisher(bad, batches, process_group=group))
    out["bad_estimator"] = _error(lambda: natgrad.fisher(
        model, batches, estimator="empirical" if rank == last else "exact", process_group=group))
    out["bad_variance"] = _error(lambda: natgrad.fisher(
        model, iter([b[0] for b in batches]), natgrad.Gaussian(variance=2.0 if rank == last else 1.0),
        process_group=group))
    out["typo_one_rank"] = _error(lambda: natgrad.fisher(
        model, batches, structure="kfacc" if rank == last else "kfac", process_group=group))
    out["typo_all_ranks"] = _error(lambda: natgrad.fisher(model, batches, structure="kfacc", process_group=group))
    for structure in ("kfac", "implicit"):
        empty = (x[:0], y[:0]) if rank == last else batches
        out["empty_" + structure] = _error(lambda: natgrad.fisher(model, empty, structure=structure,
                                                                  process_group=group))
    out["wrong_group"] = _error(lambda: natgrad.fisher(model, batches, process_group="world"))
    # the group is still usable after all of that
    out["after"] = natgrad.fisher(model, batches, structure="diagonal", process_group=group).to_dense()
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request):
    world = request.param
    return world, run_ranks(world, _scenarios)


# --------------------------------------------------------------------------------------
# references on the union (computed once for both world sizes)
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def expected(model_name, estimator, structure):
    model, x, y = union_data(model_name)
    return H.expected_matrix(model, x, y, "categorical", estimator, structure)


@functools.lru_cache(maxsize=None)
def single_process_kfac(model_name, estimator):
    model, x, y = union_data(model_name)
    F = H.lib().fisher(model, (x, y), "categorical", estimator, "kfac")
    return [(op.input_factor, op.output_factor) for op in F.operators]


def solve_bound(M, b, x_ref, iterative):
    """Error bound of (M + dI)⁻¹ b: CG's relative residual τ gives τ‖b‖/d; a direct solve a
    few eps times the condition number (factor 10 of slack on both, as in test_contract)."""
    cond = (float(torch.linalg.eigvalsh(M).max()) + DAMPING) / DAMPING
    direct = 10 * EPS * cond * float(x_ref.norm()) * M.shape[0]
    return direct + (10 * H.CG_TOL * float(b.norm()) / DAMPING if iterative else 0.0)


def assert_same_on_every_rank(results, key):
    first = results[0]
    for rank, result in enumerate(results[1:], 1):
        for name, value in result.items():
            assert torch.equal(value, first[name]), f"{key} {name}: rank {rank} differs bitwise from rank 0"


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------
def test_every_structure_is_the_fisher_of_the_union(ranks):
    world, results = ranks
    for (model_name, estimator, structure), case in results[0]["union"].items():
        key = f"{world} ranks {model_name} {estimator} {structure}"
        per_rank = [{k: v for k, v in r["union"][model_name, estimator, structure].items()
                     if isinstance(v, torch.Tensor)} for r in results]
        assert_same_on_every_rank(per_rank, key)
        want = expected(model_name, estimator, structure)
        H.assert_rel_close(case["dense"], want, RTOL, key)
        if case["examples"] is not None:
            assert case["examples"] == TOTAL, key
        # natural_gradient on the reduced Fisher is the damped solve with the union's matrix
        g = fixed_vector(want.shape[0])
        x_ref = torch.linalg.solve(want + DAMPING * torch.eye(want.shape[0], dtype=H.DT), g)
        bound = solve_bound(want, g, x_ref, structure in ("implicit", "kron_sum"))  # CG
        assert float((case["ng"] - x_ref).norm()) <= bound, key


def test_kfac_factors_equal_single_process_factors_on_the_union(ranks):
    world, results = ranks
    for model_name in MODELS:
        model, x, y = union_data(model_name)
        for estimator in ESTIMATORS:
            reduced = results[0]["union"][model_name, estimator, "kfac"]["factors"]
            single = single_process_kfac(model_name, estimator)
            reference = ref.kfac_factors(model, x, y, "categorical", estimator)
            assert len(reduced) == len(single) == len(reference)
            for got, want, (name, pairs) in zip(reduced, single, reference.items()):
                for which in (0, 1):
                    what = f"{world} ranks {model_name} {estimator} layer {name} factor {'AG'[which]}"
                    H.assert_rel_close(got[which], want[which], RTOL, what)
                    H.assert_rel_close(got[which], torch.stack([p[which] for p in pairs]), RTOL, what)


def test_implicit_solve_diagonal_trace_are_collective_and_exact(ranks):
    world, results = ranks
    for model_name in MODELS:
        for estimator in ESTIMATORS:
            case = results[0]["union"][model_name, estimator, "implicit"]
            want = expected(model_name, estimator, "implicit")
            if model_name == "mlp":
                H.assert_rel_close(case["diagonal"], want.diagonal(), RTOL, "implicit diagonal")
                H.assert_rel_close(case["trace"], want.trace(), RTOL, "implicit trace")
            b = fixed_vector(want.shape[0], 2)
            x_ref = torch.linalg.solve(want + DAMPING * torch.eye(want.shape[0], dtype=H.DT), b)
            bound = solve_bound(want, b, x_ref, iterative=True)
            assert float((case["solve"] - x_ref).norm()) <= bound, (world, model_name, estimator)


def test_ddp_model_is_unwrapped_and_no_group_means_local(ranks):
    world, results = ranks
    model, x, y = union_data("mlp")
    for rank, result in enumerate(results):
        if "ddp" in result:
            assert torch.equal(result["ddp"], results[0]["union"]["mlp", "exact", "dense"]["dense"]), rank
        local = torch.cat([b[0] for b in rank_batches(x, y, SPLITS[world], rank)])
        H.assert_rel_close(result["local"], ref.fisher_exact(model, local, "categorical"), RTOL,
                           f"rank {rank} without process_group")


def test_mc_ranks_agree_and_estimate_the_union(ranks):
    """Each rank draws with its own seed; the reduced matrix is one matrix on every rank, close
    to the exact diagonal of the union (9 000 draws: ~1 % of Monte-Carlo error here)."""
    world, results = ranks
    for result in results[1:]:
        assert torch.equal(result["mc"], results[0]["mc"])
    want = expected("mlp", "exact", "diagonal")
    assert H.rel_err(results[0]["mc"], want) < 0.1


def test_factors_travel_as_upper_triangles_in_one_bucket(ranks):
    world, results = ranks
    factors = results[0]["union"]["cnn", "exact", "kfac"]["factors"]
    triangle = sum(m.shape[0] * m.shape[-1] * (m.shape[-1] + 1) // 2 for pair in factors for m in pair)
    for result in results:
        sent = [nbytes for what, nbytes in result["kfac_log"] if what == "Kronecker factors"]
        assert sent == [8 * triangle]
        products = result["product_log"]
        P = ref.num_params(H.mlp(3))
        assert products == [("implicit Fisher product", 8 * P * 3)], "one all-reduce per product"


def test_mismatched_model_or_options_fail_on_every_rank(ranks):
    world, results = ranks
    for key in ("bad_params", "bad_estimator", "bad_variance"):
        for rank, result in enumerate(results):
            kind, message = result[key]
            assert kind == "ValueError" and f"ranks [{world - 1}] differ from rank 0" in message, (key, rank)
    # an invalid option on one rank: that rank says what is wrong, the others that it differs
    for rank, result in enumerate(results):
        kind, message = result["typo_one_rank"]
        assert kind == "ValueError"
        assert ("unknown structure" if rank == world - 1 else "differ from rank 0") in message
        assert result["typo_all_ranks"][0] == "ValueError" and "unknown structure" in result["typo_all_ranks"][1]


def test_a_rank_failing_on_its_data_stops_every_rank(ranks):
    world, results = ranks
    for structure in ("kfac", "implicit"):
        for rank, result in enumerate(results):
            kind, message = result["empty_" + structure]
            if rank == world - 1:
                assert kind == "ValueError" and "data is empty" in message
            else:
                assert kind == "DistributedError" and f"rank(s) [{world - 1}] failed" in message
    for result in results:
        H.assert_rel_close(result["after"], expected("mlp", "exact", "diagonal"), RTOL, "after the errors")


def test_wrong_group_type_is_a_type_error(ranks):
    _, results = ranks
    for result in results:
        kind, message = result["wrong_group"]
        assert kind == "TypeError" and "ProcessGroup" in message


def test_process_group_without_torch_distributed_is_a_value_error():
    assert not dist.is_initialized()
    model, x, _ = union_data("mlp")
    with pytest.raises(ValueError, match="not initialised"):
        H.lib().fisher(model, x, process_group=object())
