"""PRONG (Desjardins et al. 2015, "Natural Neural Networks"): any first-order optimizer on a
whitened model, with the whitening re-estimated every ``every`` steps.

::

    model = natgrad.nn.whiten(model)                       # or whiten(model, batchnorm=True): PRONG+
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = natgrad.optim.PRONG(model, base, x_train)        # reparametrizes once here
    for x, y in loader:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()                                         # base step; every `every` steps a reparametrization

Algorithm 1 of the paper (with its sign errors corrected, see docs): at t = 0, T, 2T, ... — i.e.
at construction and right after every ``every``-th step — :func:`natgrad.nn.reparametrize` runs
the model on ``samples`` training inputs, sets each layer's ``μ``, ``U = (Σ + εI)^(-1/2)`` and
changes ``V``, ``d`` so that the network computes exactly the same function. The base optimizer's
state for the reparametrized parameters (momentum, Adam moments, step counts) refers to the old
coordinates, so it is **reset** (the fix of the paper's footnote 6); with ``momentum="transform"``
(``torch.optim.SGD`` only) SGD momentum buffers are instead mapped to the new coordinates as the
parameter displacements they are (``ΔV ← ΔV U_old U_new⁻¹``, ``Δd ← Δd + ΔW (μ_new − μ_old)``),
so the pending momentum moves the function exactly as it would have.

Data parallel (``torch.nn.parallel.DistributedDataParallel``, or any initialised default
group): the loop is unchanged. Each rank draws ``samples`` inputs from its *own* ``data`` (its
shard) and the reparametrization uses the union of all ranks' draws (``R × samples`` rows on
``R`` ranks; :func:`natgrad.nn.reparametrize` with the process group), so every replica gets the
same μ, U, V, d — the whitening a single process would compute from the concatenated draws.

Resume: ``state_dict()`` is the base optimizer's plus a ``"prong"`` entry (step and
reparametrization counters, the row-sampling seed). Construct PRONG (which reparametrizes),
*then* load the model's and the optimizer's state dicts (and the torch RNG): training continues
bit for bit.
"""

from __future__ import annotations

import hashlib

from typing import Callable

import torch
from torch import Tensor, nn

from ..distributed import Communicator, model_fingerprint, resolve_group, unwrap
from ..nn.reduction import check_process_group
from ..nn.reparametrize import check_eps, reparametrize_with, whitened_layers
from ..nn.sampling import check_data, draw_inputs
from ..nn.whitened import WhitenedLayer

__all__ = ["PRONG"]

MOMENTUM_POLICIES = ("reset", "transform")


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class PRONG(torch.optim.Optimizer):
    """Projected Natural Gradient Descent: ``base_optimizer`` on a whitened model, reparametrized
    from ``samples`` inputs of ``data`` before the first step and after every ``every`` steps.

    Args:
        model: a model with whitened layers (:func:`natgrad.nn.whiten`), or its
            DistributedDataParallel wrapper (either may be passed; the module inside is used).
        base_optimizer: a ``torch.optim.Optimizer`` over (some of) ``model``'s parameters,
            including whitened layers' parameters; it performs the steps. ``param_groups``,
            ``state`` and ``defaults`` are the base optimizer's (LR schedulers work on PRONG).
        data: training inputs: a tensor (``samples`` random rows are drawn each time, without
            replacement; all rows if there are fewer), an ``(x, y)`` tuple of tensors, or a
            re-iterable DataLoader / list of batches (tensors or ``(x, y)``), from which the first
            batches of a fresh pass are concatenated up to ``samples`` rows. In a process group,
            this rank's inputs (its shard; it may be empty if other ranks' are not).
        every: T, the reparametrization period in steps (default 100).
        samples: N_s, the number of inputs the statistics are estimated from (default 1000; per rank
            in a process group).
        eps: ε > 0 added to the covariance eigenvalues (default 1e-2).
        momentum: ``"reset"`` (default): after a reparametrization the base optimizer's state of
            the whitened layers' parameters is cleared; ``"transform"``: SGD momentum buffers
            are mapped to the new coordinates (``torch.optim.SGD`` only).
        seed: seed of the rows drawn from a tensor ``data`` (default ``torch.initial_seed()``;
            rank 0's in a process group); the k-th reparametrization on rank r draws with a
            generator seeded from (seed, r, k), so ranks given the same tensor draw different
            rows and a resumed run draws what the uninterrupted one would; the global RNG is
            not used for it.
        process_group: the ranks to reparametrize over. ``None`` (default): the group of a
            DistributedDataParallel ``model``, else the default group if torch.distributed is
            initialised, else this process alone. Each rank draws from its own ``data``; the
            statistics are those of the union (see the module docstring). At construction the
            ranks are checked to hold the same model (parameters and whitening buffers) and the
            same options (``every``, ``samples``, ``eps``, ``momentum``, base optimizer and its
            hyper-parameters): ValueError on every rank otherwise.

    Attributes: ``steps`` (completed steps), ``reparametrizations`` (count, including the one
    at construction), ``last_info`` (what :func:`natgrad.nn.reparametrize` returned last),
    ``comm`` (the :class:`~natgrad.distributed.Communicator`, None on one process).
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        data,
        every: int = 100,
        samples: int = 1000,
        eps: float = 1e-2,
        momentum: str = "reset",
        seed: int | None = None,
        *,
        process_group: object = None,
    ) -> None:
        self.comm: Communicator | None = resolve_group(model, check_process_group(process_group))
        model = unwrap(model)
        layers = whitened_layers(model)
        if not layers:
            raise ValueError(
                "PRONG needs a model with whitened layers: convert it with model = natgrad.nn.whiten(model) "
                "and build the base optimizer over the converted model's parameters"
            )
        if isinstance(base_optimizer, PRONG) or not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer over the whitened model's parameters "
                f"(e.g. torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), got {type(base_optimizer).__name__}"
            )
        model_params = {id(p) for p in model.parameters()}
        base_params = [p for g in base_optimizer.param_groups for p in g["params"]]
        if any(id(p) not in model_params for p in base_params):
            raise ValueError(
                "base_optimizer has parameters that are not the model's: create it over the whitened model's "
                "parameters, after natgrad.nn.whiten (whiten copies the model unless inplace=True)"
            )
        whitened_params = {id(p) for _, layer in layers for p in layer.parameters()}
        if not any(id(p) in whitened_params for p in base_params):
            raise ValueError("base_optimizer optimizes none of the whitened layers' parameters")
        every = _check_count("every", every)
        samples = _check_count("samples", samples)
        eps = check_eps(eps)
        if momentum not in MOMENTUM_POLICIES:
            raise ValueError(f"momentum must be one of {MOMENTUM_POLICIES}, got {momentum!r}")
        if momentum == "transform" and not isinstance(base_optimizer, torch.optim.SGD):
            raise ValueError("momentum='transform' maps SGD momentum buffers: it needs a torch.optim.SGD base "
                             "optimizer; use momentum='reset' for others")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an integer or None, got {type(seed).__name__}")
        data = check_data(data, allow_empty=self.comm is not None)

        # torch.optim.Optimizer's own set-up (hooks, step profiling) on a placeholder; param_groups,
        # state and defaults are then the base optimizer's (see the properties below).
        super().__init__([nn.Parameter(torch.zeros(0))], {})
        self.__dict__.pop("_placeholder_groups", None)
        self.__dict__.pop("_placeholder_state", None)
        self.__dict__.pop("_placeholder_defaults", None)
        self.base_optimizer = base_optimizer
        self.model = model
        self.data = data
        self.every = every
        self.samples = samples
        self.eps = eps
        self.momentum = momentum
        self.generator = torch.Generator()
        self.seed = (torch.initial_seed() if seed is None else seed) % 2**62
        if self.comm is not None:  # rank 0's: a checkpoint written by rank 0 resumes every rank
            local = torch.tensor([self.seed if self.rank == 0 else 0], dtype=torch.int64, device=self.comm.device)
            (common,) = self.comm.all_reduce([local], what="PRONG seed")
            self.seed = int(common)
        self.steps = 0
        self.reparametrizations = 0
        self.last_info: dict | None = None
        if self.comm is not None:
            self._check_ranks()
        # t = 0. What it changes is kept until the first step, so that load_state_dict can undo it
        # when the model already holds a checkpoint (loaded before PRONG was constructed).
        undo = [(t, t.detach().clone()) for _, layer in layers
                for t in (layer.weight, layer.bias, layer.mean, layer.whitener) if t is not None]
        self.reparametrize()
        self._undo = [(t, saved, t._version) for t, saved in undo]

    @property
    def rank(self) -> int:
        return 0 if self.comm is None else self.comm.rank

    def _check_ranks(self) -> None:
        """ValueError on every rank unless all hold the same model and options."""
        description, checksums = model_fingerprint(self.model)
        buffers = [t.detach().double().sum() for _, layer in whitened_layers(self.model)
                   for t in (layer.mean, layer.whitener)]
        plain = (int, float, bool, str, tuple, type(None))
        groups = [sorted((k, v) for k, v in g.items() if k != "params" and isinstance(v, plain))
                  + [("params", len(g["params"]))] for g in self.base_optimizer.param_groups]
        options = (f"PRONG|every={self.every}|samples={self.samples}|eps={self.eps!r}|momentum={self.momentum}|"
                   f"{type(self.base_optimizer).__name__}|{groups}")
        values = torch.cat([checksums.cpu(), torch.stack(buffers).cpu()])
        self.comm.check_same(f"{description}|{options}", values,
                             "PRONG setup: the model (parameters, whitening buffers) or the options")

    # ---------------------------------------------------------------- proxies to the base optimizer
    @property
    def param_groups(self) -> list[dict]:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            return self.__dict__.setdefault("_placeholder_groups", [])
        return base.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_groups"] = value
        else:
            base.param_groups = value

    @property
    def state(self):
        base = self.__dict__.get("base_optimizer")
        if base is None:
            return self.__dict__.setdefault("_placeholder_state", {})
        return base.state

    @state.setter
    def state(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_state"] = value
        else:
            base.state = value

    @property
    def defaults(self) -> dict:
        base = self.__dict__.get("base_optimizer")
        return self.__dict__.get("_placeholder_defaults", {}) if base is None else base.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:
            self.__dict__["_placeholder_defaults"] = value
        else:
            base.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is None:  # the placeholder group of Optimizer.__init__
            self.__dict__.setdefault("_placeholder_groups", []).append(param_group)
            return
        model_params = {id(p) for p in self.model.parameters()}
        params = param_group.get("params", [])
        params = [params] if isinstance(params, Tensor) else list(params)
        if any(id(p) not in model_params for p in params):
            raise ValueError("the new param group has parameters that are not the model's")
        base.add_param_group(param_group)

    # ---------------------------------------------------------------- data
    def sample_inputs(self) -> Tensor:
        """The inputs of the next reparametrization (``samples`` rows of this rank's ``data``;
        :func:`natgrad.nn.sampling.draw_inputs`)."""
        self.generator.manual_seed(_draw_seed(self.seed, self.rank, self.reparametrizations))
        return draw_inputs(self.data, self.samples, self.generator, allow_empty=self.comm is not None)

    # ---------------------------------------------------------------- the loop
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def backward(self, loss: Tensor, output: Tensor | None = None) -> None:
        """``loss.backward()`` (for loops written for natgrad's curvature optimizers)."""
        loss.backward()

    def step(self, closure: Callable[[], Tensor] | None = None):
        """One step of the base optimizer; after every ``every``-th step, a reparametrization."""
        self._undo = None
        loss = self.base_optimizer.step() if closure is None else self.base_optimizer.step(closure)
        self.steps += 1
        if self.steps % self.every == 0:
            self.reparametrize()
        return loss

    def reparametrize(self) -> dict:
        """Reparametrize now from fresh samples of ``data`` and reset (or transform) the base
        optimizer's state of the whitened layers. Returns the per-layer info."""
        info = reparametrize_with(self.model, self.sample_inputs(), self.eps, self.comm)
        self._after_reparametrization(info)
        self.reparametrizations += 1
        self.last_info = info
        return info

    @torch.no_grad()
    def _after_reparametrization(self, info: dict) -> None:
        state = self.base_optimizer.state
        for name, layer in whitened_layers(self.model):
            params = [p for p in (layer.weight, layer.bias) if p is not None]
            if self.momentum == "reset" or info.get(name) is None:
                if info.get(name) is not None:
                    for p in params:
                        state.pop(p, None)
                continue
            self._transform_momentum(layer, info[name])

    def _transform_momentum(self, layer: WhitenedLayer, info: dict) -> None:
        state = self.base_optimizer.state
        weight, bias = layer.weight, layer.bias
        buf_v = state[weight].get("momentum_buffer") if weight in state else None
        buf_d = state[bias].get("momentum_buffer") if bias is not None and bias in state else None
        if buf_v is None and buf_d is None:
            return
        v = torch.zeros_like(weight) if buf_v is None else buf_v
        d = None if bias is None else (torch.zeros_like(bias) if buf_d is None else buf_d)
        new_v, new_d = layer.change_coordinates(v, d, (info["previous_mean"], info["previous_whitener"]),
                                                info["whitening"])
        if buf_v is not None:
            buf_v.copy_(new_v)
        if bias is not None:
            if buf_d is not None:
                buf_d.copy_(new_d)
            elif self._optimizes(bias):
                state[bias]["momentum_buffer"] = new_d.to(bias.dtype).clone()

    def _optimizes(self, param: Tensor) -> bool:
        return any(p is param for g in self.base_optimizer.param_groups for p in g["params"])

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        state = self.base_optimizer.state_dict()
        state["prong"] = {
            "steps": self.steps,
            "reparametrizations": self.reparametrizations,
            "seed": self.seed,
            "every": self.every,
            "samples": self.samples,
            "eps": self.eps,
            "momentum": self.momentum,
        }
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the base optimizer, the counters and the row-sampling generator (the model's
        own state — V, d, μ, U — is in ``model.state_dict()``).

        Resuming is bit-exact whether the model's state was loaded after constructing PRONG or
        before: in the latter case (no step taken and the whitened layers untouched since the
        construction), the construction's reparametrization is undone, since the checkpoint's
        model was already reparametrized on the saved schedule."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("prong", None)
        if not isinstance(extra, dict) or "steps" not in extra:
            raise ValueError("not a PRONG state_dict (it has no 'prong' entry): use PRONG.state_dict() to save")
        self.base_optimizer.load_state_dict(state_dict)
        self.steps = int(extra["steps"])
        self.reparametrizations = int(extra.get("reparametrizations", 0))
        self.seed = int(extra.get("seed", self.seed))
        undo, self._undo = self.__dict__.get("_undo"), None
        if undo and all(t._version == version for t, _, version in undo):
            with torch.no_grad():
                for t, saved, _ in undo:
                    t.copy_(saved)

    def __getstate__(self) -> dict:
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"PRONG(every={self.every}, samples={self.samples}, eps={self.eps}, momentum={self.momentum!r}, "
                f"base={type(self.base_optimizer).__name__})")


def _draw_seed(seed: int, rank: int, count: int) -> int:
    """A 63-bit generator seed for the ``count``-th draw of ``rank``, mixed from the base seed."""
    digest = hashlib.sha256(f"{seed}:{rank}:{count}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
