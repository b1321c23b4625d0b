"""PRONG and reparametrize over torch.distributed: 2 and 3 gloo processes on CPU.

The reference is always one process on the concatenation of the ranks' inputs (and, for
training, of their batches): the distributed reparametrization must estimate μ and Σ of the
union of the inputs, so every rank ends with the buffers and parameters one process computes
from all the data. Each world size is spawned once (module fixture) and runs every scenario.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as TF
from torch import nn

from distributed_harness import run_ranks

DT = torch.float64
WORLDS = (2, 3)
EVERY, STEPS, BATCH = 2, 5, 6

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")


# --------------------------------------------------------------------------------------
# models and per-rank data (every rank rebuilds the same model from the seed)
# --------------------------------------------------------------------------------------
def mlp(seed=0, dtype=DT, hidden=5):
    import natgrad.nn as nnn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 4, bias=False), nn.Tanh(),
                          nn.Linear(4, 3))
    return nnn.whiten(model.to(dtype))


def cnn(seed=0):
    import natgrad.nn as nnn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
        nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(3, 3, 2, padding="same"), nn.Flatten(), nn.Linear(3 * 4 * 4, 3),
    )
    return nnn.whiten(model.to(DT))


def mlp_rows(world, offset=0.0):
    """Correlated, off-centre inputs; rank r has its own rows, 13 + 8r of them (none on rank 2).
    Feature 0 is constant (the same on every rank: an exact zero row of Σ); feature 5 is constant
    on each rank but differs between ranks (not constant in the union: the per-feature ranges
    must be reduced too)."""
    g = torch.Generator().manual_seed(world)
    mix = torch.randn(6, 6, generator=g, dtype=DT)
    parts = []
    for r in range(world):
        x = torch.randn(0 if r == 2 else 13 + 8 * r, 6, generator=g, dtype=DT) @ mix + offset
        x[:, 0] = 1.5
        x[:, 5] = 0.5 * r - 1
        parts.append(x)
    return parts


def cnn_images(world):
    g = torch.Generator().manual_seed(10 + world)
    return [torch.randn(3 + 2 * r, 2, 7, 7, generator=g, dtype=DT) + torch.tensor([1.5, -0.5], dtype=DT)[:, None, None]
            for r in range(world)]


def batches(world):
    """For each step, each rank's batch of BATCH (inputs, labels)."""
    g = torch.Generator().manual_seed(100 + world)
    return [[(torch.randn(BATCH, 6, generator=g, dtype=DT) + 1.0, torch.randint(0, 3, (BATCH,), generator=g))
             for _ in range(world)] for _ in range(STEPS)]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model, opt, steps):
    for x, y in steps:
        opt.zero_grad()
        TF.cross_entropy(model(x), y).backward()
        opt.step()


def prong_options():
    return dict(every=EVERY, samples=1000, eps=1e-2)


# --------------------------------------------------------------------------------------
# what every rank runs
# --------------------------------------------------------------------------------------
def _error(fn):
    try:
        fn()
    except (TypeError, ValueError) as error:
        return type(error).__name__, str(error)
    return None


def _on_rank(rank, world):
    import natgrad.nn as nnn
    from natgrad.optim import PRONG

    torch.manual_seed(0)
    group = dist.group.WORLD
    out = {}

    # reparametrize on the union: MLP (twice: the second pass is shifted by the first's μ), CNN via DDP
    model = mlp()
    infos = [nnn.reparametrize(model, mlp_rows(world)[rank], process_group=group) for _ in range(2)]
    out["mlp"] = state(model)
    out["mlp_samples"] = {k: v["samples"] for k, v in infos[-1].items()}
    model = cnn()
    nnn.reparametrize(nn.parallel.DistributedDataParallel(model), cnn_images(world)[rank], process_group=group)
    out["cnn"] = state(model)

    # float32: the float64 fallback taken by every rank from the reduced sums (only rank 1's rows
    # are far off-centre), and a one-shot iterator on rank 0 making every rank sum in float64
    model = mlp(dtype=torch.float32)
    rows = mlp_rows(world, offset=300.0 if rank == 1 else 0.0)[rank].float()
    info = nnn.reparametrize(model, rows, process_group=group)
    out["fallback"] = (state(model), sorted({str(v["whitening"].dtype) for v in info.values()}))
    model = mlp(dtype=torch.float32)
    rows = mlp_rows(world)[rank].float()
    info = nnn.reparametrize(model, iter([rows]) if rank == 0 else rows, process_group=group)
    out["one_shot"] = (state(model), sorted({str(v["whitening"].dtype) for v in info.values()}))

    # no process group inside a distributed job: this rank's inputs only
    model = mlp()
    nnn.reparametrize(model, mlp_rows(world)[0] + rank)
    out["local"] = state(model)

    # PRONG on a DDP model (and on the module inside, found through the default group)
    data = mlp_rows(world)[rank]
    for key, momentum, wrap in (("prong", "reset", True), ("prong_transform", "transform", False)):
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = PRONG(ddp if wrap else model, base, data, momentum=momentum, **prong_options())
        train(ddp, opt, [step[rank] for step in batches(world)])
        out[key] = (state(model), opt.reparametrizations, opt.comm is not None,
                    {k: v["samples"] for k, v in opt.last_info.items()})

    # errors: different models, different options, different whitened layers, bad group
    def prong(model=None, **options):
        model = mlp() if model is None else model
        PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), data, **{**prong_options(), **options})

    def perturbed():
        model = mlp()
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-12 * rank
        return model

    out["errors"] = {
        "model": _error(lambda: prong(perturbed())),
        "options": _error(lambda: prong(every=EVERY + rank)),
        "layers": _error(lambda: nnn.reparametrize(mlp(hidden=5 + rank), data, process_group=group)),
        "group_prong": _error(lambda: prong(process_group="world")),
        "group_reparametrize": _error(lambda: nnn.reparametrize(mlp(), data, process_group=0)),
    }
    return out


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ranks(request):
    world = request.param
    return world, run_ranks(world, _on_rank)


# --------------------------------------------------------------------------------------
# the single-process references
# --------------------------------------------------------------------------------------
def assert_states_close(got, expected, atol=1e-10, rtol=1e-10):
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")


def assert_same_on_ranks(results, key):
    first = results[0][key]
    first = first[0] if isinstance(first, tuple) else first
    for r, result in enumerate(results[1:], 1):
        other = result[key][0] if isinstance(result[key], tuple) else result[key]
        for k in first:
            assert torch.equal(other[k], first[k]), f"{key}: {k} differs between rank 0 and rank {r}"


@pytest.mark.parametrize("key", ["mlp", "cnn", "fallback", "one_shot", "prong", "prong_transform"])
def test_identical_on_every_rank(ranks, key):
    _, results = ranks
    assert_same_on_ranks(results, key)


def test_reparametrize_mlp_equals_one_process_on_the_union(ranks):
    import natgrad.nn as nnn

    world, results = ranks
    model, union = mlp(), torch.cat(mlp_rows(world))
    infos = [nnn.reparametrize(model, union) for _ in range(2)]
    assert_states_close(results[0]["mlp"], state(model))
    assert results[0]["mlp_samples"] == {k: v["samples"] for k, v in infos[-1].items()}
    assert results[0]["mlp_samples"]["0"] == union.shape[0]


def test_reparametrize_cnn_equals_one_process_on_the_union(ranks):
    import natgrad.nn as nnn

    world, results = ranks
    model = cnn()
    nnn.reparametrize(model, torch.cat(cnn_images(world)))
    assert_states_close(results[0]["cnn"], state(model))


def test_float32_fallback_and_one_shot_are_common_decisions(ranks):
    import natgrad.nn as nnn

    world, results = ranks
    local = mlp(dtype=torch.float32)
    info = nnn.reparametrize(local, mlp_rows(world)[0].float())  # rank 0's rows alone: float32 suffices
    assert {v["whitening"].dtype for v in info.values()} == {torch.float32}
    for key, offset in (("fallback", 300.0), ("one_shot", 0.0)):
        rows = mlp_rows(world)
        rows[1] = mlp_rows(world, offset=offset)[1]  # as on rank 1
        union = torch.cat(rows).float()
        model = mlp(dtype=torch.float32)
        nnn.reparametrize(model, iter([union]) if key == "one_shot" else union)
        for result in results:
            got, dtypes = result[key]
            assert dtypes == ["torch.float64"], key
            assert_states_close(got, state(model), atol=1e-6, rtol=1e-5)


def test_no_process_group_is_local_inside_a_distributed_job(ranks):
    import natgrad.nn as nnn

    world, results = ranks
    for rank, result in enumerate(results):
        model = mlp()
        nnn.reparametrize(model, mlp_rows(world)[0] + rank)
        assert_states_close(result["local"], state(model))


@pytest.mark.parametrize("key", ["prong", "prong_transform"])
def test_prong_with_ddp_equals_one_process_on_the_union(ranks, key):
    """Per-rank batches of BATCH vs one process on their concatenation; reparametrization data:
    each rank's rows vs all of them (samples ≥ rows, so every row is used on both sides)."""
    from natgrad.optim import PRONG

    world, results = ranks
    model = mlp()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = PRONG(model, base, torch.cat(mlp_rows(world)), momentum=key == "prong" and "reset" or "transform",
                **prong_options())
    assert opt.comm is None
    steps = [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step])) for step in batches(world)]
    train(model, opt, steps)
    for got, reparametrizations, distributed, samples in (r[key] for r in results):
        assert distributed and reparametrizations == opt.reparametrizations == 1 + STEPS // EVERY
        assert samples == {k: v["samples"] for k, v in opt.last_info.items()}
        assert_states_close(got, state(model))
    assert not torch.allclose(state(model)["0.weight"], mlp().state_dict()["0.weight"])  # it did train


def test_mismatches_raise_on_every_rank(ranks):
    _, results = ranks
    for rank, result in enumerate(results):
        errors = result["errors"]
        for key in ("model", "options", "layers"):
            assert errors[key] is not None and errors[key][0] == "ValueError", (rank, key, errors[key])
        assert "PRONG setup" in errors["model"][1] and "ranks [1" in errors["model"][1]
        assert "whitened layers differ" in errors["layers"][1]
        assert errors["group_prong"][0] == "TypeError" and "ProcessGroup" in errors["group_prong"][1]
        assert errors["group_reparametrize"][0] == "TypeError"


def test_bad_process_group_on_one_process():
    import natgrad.nn as nnn
    from natgrad.optim import PRONG

    model = mlp()
    data = mlp_rows(2)[0]
    with pytest.raises(TypeError, match="ProcessGroup"):
        nnn.reparametrize(model, data, process_group="world")
    with pytest.raises(TypeError, match="ProcessGroup"):
        PRONG(model, torch.optim.SGD(model.parameters(), lr=0.1), data, process_group=object())
    before = copy.deepcopy(state(model))
    nnn.reparametrize(model, data, process_group=None)  # local, no torch.distributed needed
    assert not torch.equal(before["0.whitener"], state(model)["0.whitener"])
