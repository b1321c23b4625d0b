"""EKFAC (George et al. 2018): in K-FAC's eigenbasis, the diagonal is re-fit to the data, so
||F_block - EKFAC||_F <= ||F_block - KFAC||_F for every layer block, where F_block is the
exact layer block of the same estimator (from the reference). Also trace(EKFAC block) =
trace(F_block), since s sums the squared per-example gradients in an orthonormal basis."""

import pytest
import torch
from torch import nn

import helpers as H
import reference as ref


def random_net(seed):
    g = torch.Generator().manual_seed(seed)
    depth = int(torch.randint(1, 4, (1,), generator=g))
    sizes = [int(torch.randint(2, 6, (1,), generator=g)) for _ in range(depth + 1)] + [3]
    acts = [nn.Tanh, nn.Sigmoid, nn.ReLU]
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(acts[(seed + i) % 3]())
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bool((seed + i) % 4)))
    return nn.Sequential(*layers).to(H.DT)


NETS = [(f"mlp{s}", lambda s=s: random_net(s)) for s in range(6)] + [
    ("cnn", lambda: H.cnn(50)),
    ("cnn_exotic", lambda: H.cnn_exotic(51)),
    ("token_seq", lambda: H.token_mlp(52, pool=False)),
]


@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
@pytest.mark.parametrize("name,make", NETS, ids=[n for n, _ in NETS])
def test_ekfac_closer_than_kfac(name, make, likelihood, estimator):
    if name == "token_seq" and likelihood == "categorical":
        pytest.skip("sequence output")
    natgrad = H.lib()
    model = make()
    x, y = H.make_data(model, likelihood, 5)
    data = (x, y) if estimator == "empirical" else x
    exact = ref.block_diagonal(ref.fisher_dense(model, x, y, likelihood, estimator), model)
    K = natgrad.fisher(model, data, likelihood=likelihood, estimator=estimator,
                       structure="kfac").to_dense()
    E = natgrad.fisher(model, data, likelihood=likelihood, estimator=estimator,
                       structure="ekfac").to_dense()
    assert float((E - E.T).abs().max()) <= 1e-12 * float(E.abs().max())
    for blk_name, _, sl in ref.module_slices(model):
        fb = exact[sl, sl]
        de = float((fb - E[sl, sl]).norm())
        dk = float((fb - K[sl, sl]).norm())
        assert de <= dk * (1 + 1e-9) + 1e-12 * float(fb.norm()), (
            f"layer {blk_name}: ||F - EKFAC|| = {de:.6g} > ||F - KFAC|| = {dk:.6g}")
        tr_e, tr_f = float(torch.trace(E[sl, sl])), float(torch.trace(fb))
        assert abs(tr_e - tr_f) <= 1e-10 * abs(tr_f), (blk_name, tr_e, tr_f)
    # off-block entries are zero
    assert float((E - ref.block_diagonal(E, model)).abs().max()) == 0.0
