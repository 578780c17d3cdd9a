"""The ``ot-agnostic`` command line: Sinkhorn divergences between point-cloud files, and the demo.

Loaded only by the ``ot-agnostic`` entry point (or ``python -m ot_agnostic.cli``), never by
``import ot_agnostic``. It runs on NumPy arrays: torch is not imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import runpy
import sys
import time
from pathlib import Path

import numpy as np

import ot_agnostic

from ._io import SUFFIXES, PointCloudError, read_points
from .sinkhorn import DEFAULT_MAX_ITER, DEFAULT_TOL

PROG = "ot-agnostic"
AUTO_PROGRESS_PAIRS = 10**8  # N * M from which a bar is shown by default (on a terminal)
LIBRARY_ERRORS = (ValueError, TypeError, ImportError, NotImplementedError)

DESCRIPTION = "Optimal transport between point clouds stored in files (ot_agnostic on NumPy arrays)."
EXAMPLES = """\
examples:
  ot-agnostic divergence a.npy b.ply --blur 0.01
  ot-agnostic divergence a.csv b.csv --weights-column 3 --reach 0.5 --json
  ot-agnostic grid-divergence a.npy b.npy --blur 2 --spacing 0.8 0.8 3.0
  ot-agnostic demo --n 500
"""
GRID_HELP = "the debiased Sinkhorn divergence between two images or volumes stored as .npy files"
GRID_EPILOG = """\
input files: .npy arrays of one shape, (H, W) images or (H, W, L) volumes (any number of
axes), non-negative, equal total masses unless --reach is given. The cost is |x - y|^2 / 2
on the voxel centres i * spacing, eps = blur^2 (blur in the units of --spacing).

output: S_eps = <value> (grid <shape>, <seconds> s), or with --json one JSON object with
the keys value, seconds, n_iter, marginal_error, converged, tol, shape, spacing, blur,
reach, dtype, file_a, file_b.

exit status: 0 on success; 2 on a bad file, option or problem, with one line on stderr.
"""
DIVERGENCE_HELP = "the debiased Sinkhorn divergence S_eps between two point-cloud files"
DIVERGENCE_EPILOG = f"""\
input files ({', '.join(SUFFIXES)}):
  .npy                  an (N, D) array, or (N,) read as (N, 1)
  .csv .tsv .txt .xyz   numeric columns delimited by commas, semicolons or whitespace;
                        '#' starts a comment; a first line of column names is skipped
  .ply                  ASCII or binary PLY: the x, y, z properties of the vertex element
Points are uniformly weighted (1/N) unless --weights-column is given; weights are used as
they are (not normalised), so balanced OT (no --reach) needs equal totals in A and B.

output:
  S_eps = <value> (<backend>, <seconds> s)   e.g.  S_eps = 0.012345679 (numba/online, 0.42 s)
  <value> has 8 significant digits, <backend> is the plugin/method that ran and <seconds>
  the wall time of the computation (file reading excluded; a first run includes Numba's
  compilation). --json prints one JSON object instead, with the full-precision value and
  the keys value, backend, seconds, n_iter, n_softmin, marginal_error, converged, tol, n_a,
  n_b, dim, p, blur, reach, scaling, dtype, file_a, file_b. A result that did not reach
  --tol within --max-iter prints a ConvergenceWarning (with the measured error) on stderr.

exit status: 0 on success; 2 on a bad file, option or problem, with one line on stderr.
"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def _tolerance(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    return _fraction(text)


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


_positive.__name__ = _fraction.__name__ = _tolerance.__name__ = "number"  # argparse: "invalid number value: 'x'"
_count.__name__ = "integer"


def _add_solver_options(command, tol_help=""):
    """The options both divergence commands share: --reach, --scaling, --tol, --max-iter."""
    command.add_argument("--reach", type=_positive, default=None,
                         help="unbalanced OT with this reach (default: balanced OT)")
    command.add_argument("--scaling", type=_fraction, default=0.5, help="eps-scaling ratio in (0, 1) (default 0.5)")
    command.add_argument("--tol", type=_tolerance, default=DEFAULT_TOL, metavar="TOL",
                         help=f"marginal error to reach (default {DEFAULT_TOL:g}){tol_help}")
    command.add_argument("--max-iter", type=_count, default=DEFAULT_MAX_ITER, metavar="N",
                         help=f"at most N Sinkhorn updates at the final eps (default {DEFAULT_MAX_ITER})")


def build_parser() -> argparse.ArgumentParser:
    """The ``ot-agnostic`` argument parser, with its ``divergence`` and ``demo`` subcommands.

    Returns
    -------
    argparse.ArgumentParser
    """
    parser = _Parser(
        prog=PROG, description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {ot_agnostic.__version__}")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    div = commands.add_parser(
        "divergence", help=DIVERGENCE_HELP, description=DIVERGENCE_HELP[0].upper() + DIVERGENCE_HELP[1:] + ".",
        epilog=DIVERGENCE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    div.add_argument("a", metavar="A", help="the first point cloud (a file)")
    div.add_argument("b", metavar="B", help="the second point cloud (a file)")
    div.add_argument("--p", type=int, choices=(1, 2), default=2, help="cost |x - y|^p / p (default 2)")
    div.add_argument("--blur", type=_positive, default=0.05, help="length scale, eps = blur^p (default 0.05)")
    _add_solver_options(div, tol_help="; 'none' runs GeomLoss's fixed schedule")
    div.add_argument("--backend", default="auto",
                     help="auto, tensorized, online, multiscale, numba, array_api, ... or plugin/method "
                          "such as numba/online (default auto)")
    div.add_argument("--weights-column", type=int, default=None, metavar="K",
                     help="0-based column of the tables (.npy, text) holding the sample weights, "
                          "removed from the coordinates")
    div.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                     help="floating-point precision of the computation (default float64)")
    div.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    div.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="show a progress bar on stderr (default: when N*M >= 1e8 and stderr is a terminal)")
    div.set_defaults(run=_divergence)

    grid = commands.add_parser(
        "grid-divergence", help=GRID_HELP, description=GRID_HELP[0].upper() + GRID_HELP[1:] + ".",
        epilog=GRID_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    grid.add_argument("a", metavar="A", help="the first density (a .npy file)")
    grid.add_argument("b", metavar="B", help="the second density (a .npy file)")
    grid.add_argument("--blur", type=_positive, required=True, help="length scale, eps = blur^2, in spacing units")
    grid.add_argument("--spacing", type=_positive, nargs="+", default=[1.0], metavar="H",
                      help="voxel size: one number, or one per axis (default 1)")
    _add_solver_options(grid)
    grid.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                      help="floating-point precision of the computation (default float64)")
    grid.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    grid.set_defaults(run=_grid_divergence)

    demo = commands.add_parser(
        "demo", add_help=False, help="run the README demo, examples/demo.py (e.g. demo --n 500; demo --help)",
    )
    demo.set_defaults(run=_demo)
    return parser


def _fail(message) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _load(path: str, weights_column, dtype: str):
    """Points ``(N, D)`` and weights ``(N,)`` or None, in ``dtype``, read from ``path``."""
    points, weights = read_points(path, weights_column)
    largest = np.finfo(dtype).max
    for name, values in (("coordinates", points), ("weights", weights)):
        if values is not None and np.abs(values).max(initial=0.0) > largest:
            raise PointCloudError(path, f"{name} of size up to {np.abs(values).max():.3g} overflow {dtype}; use --dtype float64")
    return points.astype(dtype), None if weights is None else weights.astype(dtype)


def _show_progress(choice, pairs: int) -> bool:
    if choice is not None:
        return choice
    on_terminal = sys.stderr is not None and sys.stderr.isatty()
    return pairs >= AUTO_PROGRESS_PAIRS and on_terminal and importlib.util.find_spec("tqdm") is not None


def _divergence(args, extra) -> int:
    """Compute and print the Sinkhorn divergence between the files ``args.a`` and ``args.b``."""
    x, a = _load(args.a, args.weights_column, args.dtype)
    y, b = _load(args.b, args.weights_column, args.dtype)
    if x.shape[1] != y.shape[1]:
        return _fail(f"{args.a} has {x.shape[1]} coordinates per point but {args.b} has {y.shape[1]}")
    start = time.perf_counter()
    try:
        result = ot_agnostic.sinkhorn(
            x, y, a, b, p=args.p, blur=args.blur, reach=args.reach, scaling=args.scaling,
            backend=args.backend, verbose=_show_progress(args.progress, len(x) * len(y)),
            tol=args.tol, max_iter=args.max_iter,
        )
        value = float(result.value)
    except LIBRARY_ERRORS as err:
        return _fail(err)
    except MemoryError:
        return _fail("out of memory: try --backend online (O(N + M) memory) or multiscale")
    seconds = time.perf_counter() - start
    if args.json:
        report = {
            "value": value if math.isfinite(value) else None, "backend": result.backend,
            "seconds": seconds, "n_iter": int(result.n_iter), "n_softmin": int(result.n_softmin),
            "marginal_error": float(result.marginal_error), "converged": bool(result.converged),
            "tol": args.tol, "n_a": len(x), "n_b": len(y),
            "dim": x.shape[1], "p": args.p, "blur": args.blur, "reach": args.reach,
            "scaling": args.scaling, "dtype": args.dtype, "file_a": args.a, "file_b": args.b,
        }
        print(json.dumps(report))
    else:
        print(f"S_eps = {value:.8g} ({result.backend}, {seconds:.2f} s)")
    return 0


def _load_grid(path: str, dtype: str):
    """A density array read from the ``.npy`` file ``path``, in ``dtype``."""
    if not path.lower().endswith(".npy"):
        raise PointCloudError(path, "grid-divergence reads .npy arrays (np.save); convert the image first")
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise PointCloudError(path, f"not a readable .npy array ({err})") from None
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise PointCloudError(path, f"holds {values.dtype} values; a density needs real numbers")
    return values.astype(dtype)


def _grid_divergence(args, extra) -> int:
    """Compute and print the grid Sinkhorn divergence between the arrays in ``args.a``, ``args.b``."""
    from . import grids

    a, b = _load_grid(args.a, args.dtype), _load_grid(args.b, args.dtype)
    spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
    start = time.perf_counter()
    try:
        result = grids.sinkhorn(a, b, blur=args.blur, reach=args.reach, scaling=args.scaling,
                                spacing=spacing, tol=args.tol, max_iter=args.max_iter)
        value = float(result.value)
    except LIBRARY_ERRORS as err:
        return _fail(err)
    except MemoryError as err:
        return _fail(err)
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({
            "value": value if math.isfinite(value) else None, "seconds": seconds, "n_iter": int(result.n_iter),
            "marginal_error": float(result.marginal_error), "converged": bool(result.converged), "tol": args.tol,
            "shape": list(a.shape), "spacing": args.spacing, "blur": args.blur, "reach": args.reach,
            "dtype": args.dtype, "file_a": args.a, "file_b": args.b,
        }))
    else:
        print(f"S_eps = {value:.8g} (grid {'x'.join(map(str, a.shape))}, {seconds:.2f} s)")
    return 0


def demo_path() -> Path:
    """Where ``ot-agnostic demo`` looks for the demo script: ``examples/demo.py`` of a checkout.

    Returns
    -------
    Path
    """
    return Path(ot_agnostic.__file__).resolve().parents[1] / "examples" / "demo.py"


def _demo(args, extra) -> int:
    """Run ``examples/demo.py`` with the arguments ``extra``; its exit status is returned."""
    path = demo_path()
    if not path.is_file():
        return _fail(
            f"the demo script was not found at {path}: it ships with the source repository, "
            "not with the package; run it from a checkout (pip install -e .)"
        )
    saved = sys.argv
    sys.argv = [f"{PROG} demo", *extra]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit_:  # the demo's own exit: sys.exit(), argparse errors, --help
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)  # sys.exit("message") means status 1
        return 1
    finally:
        sys.argv = saved
    return 0


def main(argv=None) -> int:
    """Run the ``ot-agnostic`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name; ``sys.argv[1:]`` if None.

    Returns
    -------
    int
        The exit status: 0 on success, 2 on a usage, file or computation error (reported
        as one line on stderr), or the demo's own status.
    """
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if extra and args.command != "demo":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version and usage errors
        return 0 if exit_.code is None else exit_.code
    try:
        return args.run(args, extra)
    except PointCloudError as err:
        return _fail(err)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
