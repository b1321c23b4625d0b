"""The cases of ``fisher_bench.py``: one ``natgrad.fisher`` call (or ``F @ v``) per structure ×
estimator × workload, with natgrad's target and the fastest peer library's figure, and the
callable that is timed for each."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from _fisher_workloads import Workload

VECTOR_SEED = 1


# --------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    workload: str
    structure: str
    estimator: str
    operation: str = "construct"  # construct | product | construct+product
    metric: str = "ratio"  # ratio | seconds
    target: float | None = None  # natgrad's goal (<=), in the unit of ``metric``
    peer: tuple[str, float] | None = None  # fastest peer library and its figure
    note: str = ""


def _case(workload: str, structure: str, estimator: str, operation: str = "construct",
          **kw: Any) -> Case:
    suffix = {"construct": "", "product": "/F@v", "construct+product": "/build+F@v"}[operation]
    if structure == "implicit" and operation == "construct":
        suffix = "/build"
    return Case(f"{workload}/{structure}/{estimator}{suffix}", workload, structure, estimator,
                operation, **kw)


_FWD = "BackPACK's figure includes its forward pass; plain torch.func jvp+vjp: 2.0x"
CASES: list[Case] = [
    _case("mlp", "kfac", "mc", target=1.5, peer=("curvlinops", 2.2)),
    _case("mlp", "kfac", "exact", target=4.0, peer=("nngeometry", 7.8)),
    _case("mlp", "kfac", "empirical", peer=("curvlinops", 2.0)),
    _case("mlp", "diagonal", "mc", target=1.3, peer=("BackPACK", 2.0)),
    _case("mlp", "diagonal", "exact", target=2.5, peer=("BackPACK", 5.0)),
    _case("mlp", "diagonal", "empirical", peer=("BackPACK", 1.7)),
    _case("mlp", "implicit", "exact", "construct"),
    _case("mlp", "implicit", "exact", "product", target=2.0, peer=("BackPACK", 2.2), note=_FWD),
    _case("mlp", "implicit", "exact", "construct+product", peer=("BackPACK", 2.2), note=_FWD),
    _case("mlp", "implicit", "empirical", "construct"),
    _case("mlp", "implicit", "empirical", "product", peer=("nngeometry", 2.5)),
    _case("mlp", "implicit", "empirical", "construct+product", peer=("nngeometry", 2.5)),
    _case("cnn", "kfac", "mc", target=3.0, peer=("curvlinops", 3.7)),
    _case("cnn", "kfac", "empirical", peer=("curvlinops", 4.2)),
    _case("cnn", "kfac", "exact"),
    _case("digits", "dense", "exact", metric="seconds", target=0.15, peer=("nngeometry", 0.77)),
    _case("digits", "dense", "empirical", metric="seconds", target=0.05,
          peer=("BackPACK", 0.085)),
    _case("digits", "block_diagonal", "exact", metric="seconds"),
    _case("digits", "kron_sum", "exact", metric="seconds"),
    _case("digits", "ekfac", "exact", metric="seconds"),
]
CASES_BY_NAME = {c.name: c for c in CASES}


@dataclass
class Prepared:
    call: Callable[[], Any]
    data_mode: str | None = None
    meta: dict = field(default_factory=dict)


def _describe(F: Any, meta: dict) -> None:
    meta["type"] = f"{type(F).__module__}.{type(F).__qualname__}"
    size = getattr(F, "size", None)
    size = size() if callable(size) else size
    try:
        meta["size"] = int(size) if size is not None else None
    except (TypeError, ValueError):
        meta["size"] = str(size)


def prepare(case: Case, wl: Workload, natgrad: Any, data_mode: str) -> Prepared:
    """The callable to time for ``case``. Product cases build F and v here (untimed).
    ``data_mode`` (for multi-batch workloads) ``auto`` tries a DataLoader first and falls
    back to one call per batch if natgrad rejects it; the probe calls are untimed."""
    kw: dict[str, Any] = dict(likelihood="categorical", estimator=case.estimator,
                              structure=case.structure)
    if case.estimator == "mc":
        kw["samples"] = 1
    meta: dict = {}

    def fisher_call(mode: str) -> Callable[[], Any]:
        data = wl.natgrad_data(mode)
        if mode == "loop" and len(wl.batches) > 1:
            return lambda: [natgrad.fisher(wl.model, b, **kw) for b in data]
        return lambda: natgrad.fisher(wl.model, data, **kw)

    mode = data_mode if len(wl.batches) > 1 else None
    if mode == "auto":
        try:
            fisher_call("loader")()
            mode = "loader"
        except Exception as exc:
            meta["loader_error"] = f"{type(exc).__name__}: {exc}"
            fisher_call("loop")()  # raises if natgrad cannot do this case at all
            mode = "loop"
    build = fisher_call(mode or "single")

    if case.operation == "construct":
        first = [True]

        def call():
            F = build()
            if first[0]:
                first[0] = False
                _describe(F[0] if isinstance(F, list) else F, meta)
            return F

        return Prepared(call, mode, meta)

    v = torch.randn(wl.n_params, generator=torch.Generator().manual_seed(VECTOR_SEED))
    if mode == "loop":
        raise RuntimeError("F @ v needs natgrad.fisher to accept the whole data set")
    if case.operation == "product":
        F = build()
        _describe(F, meta)
        return Prepared(lambda: F @ v, mode, meta)
    return Prepared(lambda: build() @ v, mode, meta)  # construct+product
