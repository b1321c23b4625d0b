"""Brute-force float64 reference for the Fisher information (uses NO natgrad code).

Everything here is written plainly from the definitions, one example at a time, with
``torch.autograd``; it is slow and only meant for the tiny models of the test-suite.

Conventions (see docs/design.md and the contract in the test files):

* flat parameter order = ``model.named_parameters()`` restricted to ``requires_grad=True``;
* a model is called on one example at a time as ``model(x[n:n+1])`` and its output
  ``f_n = out[0]`` is the per-example output (flattened where a matrix is needed);
* likelihoods are given by name ("categorical", "gaussian", "bernoulli") and, for the
  Gaussian, a ``variance`` σ².

The code is in three modules, re-exported here (tests use ``import reference as ref``):
:mod:`reference_dense` (parameters, per-example quantities, the dense Fisher and its
projections), :mod:`reference_kron` (K-FAC and EKFAC per layer) and :mod:`reference_mc` (the
exact error of the Monte-Carlo Fisher).
"""

from __future__ import annotations

from reference_dense import (block_diagonal, block_mask, diag_mask, fisher_dense, fisher_empirical,
                             fisher_exact, fisher_via_columns, flat_grad, jacobian, module_slices,
                             num_params, output_columns, param_offsets, trainable)
from reference_kron import (ekfac_dense, kfac_dense, kfac_factors, layer_geometry, layer_index_map,
                            layer_samples, per_example_gamma)
from reference_mc import (mc_expected_sq_error_dense, mc_expected_sq_error_kfac,
                          mc_expected_sq_error_trace)

__all__ = ["block_diagonal", "block_mask", "diag_mask", "fisher_dense", "fisher_empirical",
           "fisher_exact", "fisher_via_columns", "flat_grad", "jacobian", "module_slices",
           "num_params", "output_columns", "param_offsets", "trainable", "ekfac_dense",
           "kfac_dense", "kfac_factors", "layer_geometry", "layer_index_map", "layer_samples",
           "per_example_gamma", "mc_expected_sq_error_dense", "mc_expected_sq_error_kfac",
           "mc_expected_sq_error_trace"]
