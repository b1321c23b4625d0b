"""Structure equalities and model variants (conv geometry, [N, T, in] inputs, no bias,
frozen parameters, generic modules, weight sharing, flat order, DataLoaders)."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import helpers as H
import reference as ref


def fisher(model, data, likelihood="categorical", estimator="exact", structure="dense", **kw):
    return H.lib().fisher(model, data, likelihood=likelihood, estimator=estimator,
                          structure=structure, **kw)


def data_arg(x, y, estimator):
    return (x, y) if estimator == "empirical" else x


# --------------------------------------------------------------------------------------
# equalities between structures (each also anchored to the reference)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_fn", [H.mlp, H.cnn, H.cnn_exotic], ids=["mlp", "cnn", "cnn_exotic"])
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
def test_structures_are_projections_of_dense(model_fn, estimator):
    model = model_fn(1)
    x, y = H.make_data(model, "categorical", 3)
    data = data_arg(x, y, estimator)
    dense = fisher(model, data, estimator=estimator, structure="dense").to_dense()
    H.assert_rel_close(dense, ref.fisher_dense(model, x, y, "categorical", estimator), H.RTOL,
                       "dense")
    blocks = fisher(model, data, estimator=estimator, structure="block_diagonal").to_dense()
    H.assert_rel_close(blocks, ref.block_diagonal(dense, model), H.RTOL, "block_diagonal")
    diag = fisher(model, data, estimator=estimator, structure="diagonal").to_dense()
    H.assert_rel_close(diag, torch.diag(torch.diagonal(dense)), H.RTOL, "diagonal")
    kron_sum = fisher(model, data, estimator=estimator, structure="kron_sum").to_dense()
    H.assert_rel_close(kron_sum, blocks, H.RTOL, "kron_sum == block_diagonal")
    implicit = fisher(model, data, estimator=estimator, structure="implicit").to_dense()
    H.assert_rel_close(implicit, dense, H.RTOL, "implicit == dense")


@pytest.mark.parametrize("likelihood", H.LIKELIHOODS)
def test_kfac_ekfac_exact_for_one_example_linear(likelihood):
    """N = 1 and only Linear layers without extra dims: K-FAC (and EKFAC) blocks are exact."""
    model = H.mlp(2, sizes=(4, 5, 3, 3))
    x, y = H.make_data(model, likelihood, 1)
    want = ref.block_diagonal(ref.fisher_exact(model, x, likelihood), model)
    for structure in ("kfac", "ekfac", "kron_sum"):
        got = fisher(model, x, likelihood, structure=structure).to_dense()
        H.assert_rel_close(got, want, 1e-8 if structure == "ekfac" else H.RTOL,
                           f"{structure} N=1")
    got = fisher(model, (x, y), likelihood, estimator="empirical", structure="kfac").to_dense()
    H.assert_rel_close(got, ref.block_diagonal(ref.fisher_empirical(model, x, y, likelihood),
                                               model), H.RTOL, "empirical kfac N=1")


# --------------------------------------------------------------------------------------
# model variants, all structures against the reference
# --------------------------------------------------------------------------------------
VARIANTS = {
    "cnn_exotic": (H.cnn_exotic, ["categorical", "gaussian"]),
    "no_bias_first": (lambda s: H.mlp(s, bias=(False, True)), ["categorical", "bernoulli"]),
    "no_bias_last": (lambda s: H.mlp(s, bias=(True, False)), ["categorical"]),
    "token_pool": (lambda s: H.token_mlp(s, pool=True), ["categorical"]),
    "token_seq": (lambda s: H.token_mlp(s, pool=False), ["gaussian", "bernoulli"]),
    "reversed_registration": (lambda s: H.reversed_net(s), ["categorical"]),
    "cnn_padmodes": (H.cnn_padmodes, ["categorical", "bernoulli"]),
    "token4d": (H.token4d, ["categorical"]),
}
VARIANT_CASES = [(v, lik) for v, (_, liks) in VARIANTS.items() for lik in liks]


@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("variant,likelihood", VARIANT_CASES)
def test_variant_matches_reference(variant, likelihood, structure):
    model = VARIANTS[variant][0](4)
    x, y = H.make_data(model, likelihood, 3)
    for estimator in ("exact", "empirical"):
        F = fisher(model, data_arg(x, y, estimator), likelihood, estimator, structure)
        want = H.expected_matrix(model, x, y, likelihood, estimator, structure)
        H.assert_rel_close(F.to_dense(), want, H.RTOL, f"{variant} {structure} {estimator}")


def test_kron_sum_equals_exact_blocks_with_sharing_dims():
    """Conv and Linear-with-T layers: kron_sum is still the exact block (unlike kfac)."""
    for model in (H.cnn_exotic(6), H.token_mlp(6, pool=False)):
        lik = "gaussian"
        x, _ = H.make_data(model, lik, 2)
        want = ref.block_diagonal(ref.fisher_exact(model, x, lik), model)
        got = fisher(model, x, lik, structure="kron_sum").to_dense()
        H.assert_rel_close(got, want, H.RTOL, type(model).__name__)
        # and K-FAC is a genuine approximation here (so the test above is not vacuous)
        kfac = ref.kfac_dense(model, ref.kfac_factors(model, x, None, lik, "exact"))
        assert H.rel_err(kfac, want) > 1e-3


# --------------------------------------------------------------------------------------
# frozen parameters
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_frozen_layer_excluded(structure):
    model = H.mlp(7, sizes=(5, 4, 4, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = H.make_data(model, "categorical", 4)
    F = fisher(model, x, structure=structure)
    P = ref.num_params(model)
    assert P == 4 * 4 + 4 + 4 * 3 + 3
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "frozen first layer")
    assert [b.name for b in F.blocks] == ["2", "4"]
    assert F.blocks[0].start == 0 and F.blocks[-1].stop == P


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_frozen_bias_generic(structure):
    model = H.mlp(8)
    model[0].bias.requires_grad_(False)
    x, y = H.make_data(model, "categorical", 4)
    F = fisher(model, x, structure=structure)
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "frozen bias")
    assert F.to_dense().shape == (5 * 4 + 4 * 3 + 3,) * 2


# --------------------------------------------------------------------------------------
# modules without a Kronecker adapter
# --------------------------------------------------------------------------------------
GENERIC_MODELS = {
    "layernorm": (H.layernorm_net, "1", "LayerNorm"),
    "batchnorm_eval": (H.batchnorm_net, "1", "BatchNorm1d"),
    "embedding": (H.embed_net, "emb", "Embedding"),
    "custom": (H.custom_net, "1", "Scale"),
    "groupnorm": (H.groupnorm_net, "1", "GroupNorm"),
    "conv1d": (H.conv1d_net, "0", "Conv1d"),
    "gru": (lambda s: H.recurrent_net(s, "gru"), "rnn", "GRU"),
    "lstm": (lambda s: H.recurrent_net(s, "lstm"), "rnn", "LSTM"),
    "attention": (H.attention_net, "att", "MultiheadAttention"),
}


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("kind", list(GENERIC_MODELS))
def test_generic_modules(kind, estimator, structure):
    model = GENERIC_MODELS[kind][0](9)
    x, y = H.make_data(model, "categorical", 4)
    F = fisher(model, data_arg(x, y, estimator), estimator=estimator, structure=structure)
    want = H.expected_matrix(model, x, y, "categorical", estimator, structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, f"{kind} {structure}")


@pytest.mark.parametrize("structure", H.KRON_STRUCTURES)
@pytest.mark.parametrize("kind", list(GENERIC_MODELS))
def test_kron_structures_reject_generic_modules(kind, structure):
    model_fn, name, cls = GENERIC_MODELS[kind]
    model = model_fn(9)
    x, _ = H.make_data(model, "categorical", 4)
    snap = H.snapshot(model)
    with pytest.raises((NotImplementedError, ValueError)) as info:
        fisher(model, x, structure=structure)
    msg = str(info.value)
    assert f"'{name}'" in msg or f'"{name}"' in msg or cls in msg, f"module not named: {msg}"
    H.assert_unchanged(model, snap)


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_linear_subclass_with_own_forward(structure):
    """A custom module that subclasses nn.Linear but computes a = (W/2) h + b: the generic
    structures are defined for any module, so they must give its true Fisher (the Linear
    math of a = W h + b does not apply to it)."""
    model = H.linear_subclass_net(18)
    x, y = H.make_data(model, "categorical", 4)
    F = fisher(model, x, structure=structure)
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, f"Linear subclass {structure}")


def test_weight_sharing_dense_matches_reference():
    model = H.shared_net(10)
    x, y = H.make_data(model, "categorical", 4)
    for structure in H.GENERIC_STRUCTURES:
        F = fisher(model, x, structure=structure)
        want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
        H.assert_rel_close(F.to_dense(), want, H.RTOL, f"shared {structure}")


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_tied_weights_generic(structure):
    """A Parameter registered in two modules appears once in named_parameters(); the dense
    Fisher includes both of its uses, and every structure is P×P for that P."""
    model = H.tied_net(17)
    x, y = H.make_data(model, "categorical", 4)
    P = ref.num_params(model)
    snap = H.snapshot(model)
    F = fisher(model, x, structure=structure)
    H.assert_unchanged(model, snap)
    assert F.size == P
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, f"tied weights {structure}")


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_module_registered_twice(structure):
    """One Linear object at two places of a Sequential: its parameters count once, both uses
    enter the Fisher, and the model keeps its Parameter objects (torch.func's weight tying
    used to leave the module holding a plain tensor)."""
    model = H.registered_twice_net(19)
    x, y = H.make_data(model, "categorical", 4)
    snap = H.snapshot(model)
    F = fisher(model, x, structure=structure)
    H.assert_unchanged(model, snap)
    assert F.size == ref.num_params(model)
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, f"registered twice {structure}")


@pytest.mark.parametrize("structure", H.KRON_STRUCTURES)
def test_tied_weights_kron_structures_refuse(structure):
    """Tied weights are weight sharing (one matrix used by two layer calls): like a Linear
    called twice, kfac/ekfac/kron_sum must refuse rather than return a wrong-sized or wrong
    matrix."""
    model = H.tied_net(17)
    x, _ = H.make_data(model, "categorical", 4)
    snap = H.snapshot(model)
    with pytest.raises((TypeError, ValueError, NotImplementedError)):
        F = fisher(model, x, structure=structure)
        # (only reached if nothing was raised: show what came back)
        raise AssertionError(f"returned {tuple(F.to_dense().shape)} for P={ref.num_params(model)}")
    H.assert_unchanged(model, snap)


# --------------------------------------------------------------------------------------
# flat order and blocks
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_blocks_follow_named_parameters(structure):
    model = H.reversed_net(11)
    x, _ = H.make_data(model, "categorical", 3)
    F = fisher(model, x, structure=structure)
    expected = ref.module_slices(model)
    assert isinstance(F.blocks, tuple)
    assert [b.name for b in F.blocks] == ["b", "a"]
    for b, (name, params, sl) in zip(F.blocks, expected):
        assert (b.start, b.stop) == (sl.start, sl.stop)
        assert b.slice == sl
        local = [p.rpartition(".")[2] for p in params]
        assert list(b.params) in (params, local), b.params
    dense = ref.fisher_exact(model, x, "categorical")
    want = H.expected_matrix(model, x, None, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "reversed registration")
    # the matrix is not invariant to the order (so the test above can fail)
    perm = torch.cat([torch.arange(15, 39), torch.arange(0, 15)])
    assert H.rel_err(dense[perm][:, perm], dense) > 1e-3


def test_blocks_cnn_cover_vector():
    model = H.cnn(0)
    x, _ = H.make_data(model, "categorical", 2)
    F = fisher(model, x, structure="block_diagonal")
    assert [b.name for b in F.blocks] == ["0", "2", "4"]
    assert [(b.start, b.stop) for b in F.blocks] == [(0, 57), (57, 113), (113, 140)]
    assert F.size == 140
    assert F.dtype == torch.float64


# --------------------------------------------------------------------------------------
# data given as a DataLoader
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", H.STRUCTURES)
@pytest.mark.parametrize("estimator", ["exact", "empirical"])
@pytest.mark.parametrize("model_fn", [H.mlp, H.cnn], ids=["mlp", "cnn"])
def test_dataloader_equals_one_batch(model_fn, estimator, structure):
    """7 examples in batches of 3, 3, 1: the mean over all examples, not over batches."""
    model = model_fn(12)
    lik = "categorical" if estimator == "exact" else "bernoulli"
    x, y = H.make_data(model, lik, 7)
    loader = DataLoader(TensorDataset(x, y), batch_size=3, shuffle=False)
    got = fisher(model, loader, lik, estimator, structure).to_dense()
    one = fisher(model, (x, y), lik, estimator, structure).to_dense()
    H.assert_rel_close(got, one, H.RTOL, "DataLoader vs one batch")
    want = H.expected_matrix(model, x, y, lik, estimator, structure)
    H.assert_rel_close(got, want, H.RTOL, "DataLoader vs reference")



# --------------------------------------------------------------------------------------
# in-place activations, unused modules, float32
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_inplace_relu_after_conv(structure):
    """ReLU(inplace=True) overwrites the conv output in place; the result must be that of
    the same network with an out-of-place ReLU."""
    model = H.cnn_inplace(14, inplace=True)
    twin = H.cnn_inplace(14, inplace=False)
    x, y = H.make_data(twin, "categorical", 3)
    snap = H.snapshot(model)
    for estimator in ("exact", "empirical"):
        F = fisher(model, data_arg(x, y, estimator), "categorical", estimator, structure)
        want = H.expected_matrix(twin, x, y, "categorical", estimator, structure)
        H.assert_rel_close(F.to_dense(), want, H.RTOL, f"inplace relu {structure} {estimator}")
    H.assert_unchanged(model, snap)


@pytest.mark.parametrize("structure", H.GENERIC_STRUCTURES)
def test_unused_module_has_zero_block(structure):
    model = H.unused_net(15)
    x, y = H.make_data(model, "categorical", 4)
    F = fisher(model, x, structure=structure)
    want = H.expected_matrix(model, x, y, "categorical", "exact", structure)
    assert float(want[24:44].abs().max()) == 0.0  # the unused Linear's rows
    H.assert_rel_close(F.to_dense(), want, H.RTOL, "unused module")


@pytest.mark.parametrize("structure", H.STRUCTURES)
def test_float32_model(structure):
    """A float32 model gives a float32 Fisher close to the float64 reference
    (float32 eps is 1.2e-7; sums of < 100 terms: 1e-4 relative is generous)."""
    model64 = H.cnn(16)
    x, y = H.make_data(model64, "categorical", 3)
    model32 = H.cnn(16).float()
    F = fisher(model32, x.float(), structure=structure)
    assert F.dtype == torch.float32 and F.to_dense().dtype == torch.float32
    want = H.expected_matrix(model64, x, y, "categorical", "exact", structure)
    H.assert_rel_close(F.to_dense().double(), want, 1e-4, f"float32 {structure}")
