"""``natgrad report``: per-layer error of each Fisher structure against the exact Fisher
(:func:`natgrad.report.report`)."""

from __future__ import annotations

from pathlib import Path

from .common import DEFAULT_OUT, _progress_enabled, int_list, name_list, nonnegative_int, positive_float, positive_int


def _flatten(lists):
    return None if lists is None else [x for sub in lists for x in sub]


def _add_report(subparsers) -> None:
    from ..report import DEFAULT_STRUCTURES, ESTIMATORS, STRUCTURES

    p = subparsers.add_parser(
        "report", help="per-layer error of each Fisher structure against the exact Fisher",
        description="Train a small tanh MLP briefly, compute the dense Fisher on N training "
                    "examples and compare every structure with it per layer: relative "
                    "Frobenius error of the layer block and cosine of the natural gradient.")
    p.add_argument("--data", choices=("digits", "mnist"), default="digits",
                   help="dataset (default: digits, scikit-learn's 8x8 digits)")
    p.add_argument("--mnist-dir", type=Path, metavar="DIR",
                   help="folder holding t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz "
                        "(required with --data mnist)")
    p.add_argument("--estimator", choices=ESTIMATORS, default="exact")
    p.add_argument("--samples", type=positive_int, default=1, metavar="K",
                   help="sampled labels per example for --estimator mc (default 1)")
    p.add_argument("--damping", type=positive_float, default=1e-3, metavar="X",
                   help="damping added to the Fisher before solving (default 1e-3)")
    p.add_argument("--structures", type=name_list(STRUCTURES), default=None,
                   metavar="S[,S...]",
                   help=f"structures to compare (default {','.join(DEFAULT_STRUCTURES)}; "
                        f"choose from {','.join(STRUCTURES)}; implicit is matrix-free, so its "
                        f"dense matrix takes one product per parameter: slow)")
    p.add_argument("--hidden", type=int_list, nargs="+", default=None, metavar="W",
                   help="hidden layer widths, e.g. 32 or 32,16 (default 32 on digits, "
                        "8 on mnist)")
    p.add_argument("--steps", type=nonnegative_int, default=200,
                   help="Adam training steps before measuring (default 200)")
    p.add_argument("--examples", type=positive_int, default=512, metavar="N",
                   help="training examples the Fisher is computed on (default 512)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--float32", action="store_true",
                   help="compute in float32 instead of float64")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--out", type=Path, metavar="DIR",
                     help=f"write DIR/report.json (default: {DEFAULT_OUT}/report.json)")
    out.add_argument("--json", type=Path, metavar="FILE", help="write the JSON to FILE")
    out.add_argument("--no-json", action="store_true", help="print the table only")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_run_report)


def _run_report(args) -> int:
    import torch

    from ..report import DEFAULT_STRUCTURES, report

    if args.data == "mnist" and args.mnist_dir is None:
        raise ValueError("--data mnist needs --mnist-dir DIR, the folder holding "
                         "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz")
    if args.data != "mnist" and args.mnist_dir is not None:
        raise ValueError("--mnist-dir is only used with --data mnist")
    result = report(
        data=args.data, mnist_dir=args.mnist_dir, estimator=args.estimator,
        samples=args.samples, damping=args.damping,
        structures=tuple(args.structures or DEFAULT_STRUCTURES),
        train_steps=args.steps, hidden=_flatten(args.hidden), examples=args.examples,
        seed=args.seed, dtype=torch.float32 if args.float32 else torch.float64,
        progress=_progress_enabled(args) == "bar")
    print(result.to_table())
    if args.no_json:
        path = None
    elif args.json is not None:
        path = args.json
    else:
        path = (Path(DEFAULT_OUT) if args.out is None else args.out) / "report.json"
    if path is not None:
        result.save(path)
        print(f"wrote {path}")
    return 0
