"""The ``ot-agnostic`` command line: file formats, options, output, errors, demo, entry point.

Most tests call :func:`ot_agnostic.cli.main` in-process on small files in ``tmp_path`` and
compare the printed value with :func:`ot_agnostic.sinkhorn_divergence` on the same arrays.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

import ot_agnostic as ota
from ot_agnostic import cli
from ot_agnostic._io import PointCloudError, read_points

ROOT = Path(__file__).resolve().parents[1]
N, M = 120, 90


@pytest.fixture(scope="module")
def clouds():
    rng = np.random.default_rng(0)
    return rng.random((N, 3)), rng.random((M, 3)) + [0.3, 0.0, 0.0]


@pytest.fixture
def files(tmp_path, clouds):
    """``a.npy`` and ``b.npy`` holding the two clouds."""
    x, y = clouds
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    return tmp_path / "a.npy", tmp_path / "b.npy"


def run(capsys, *args):
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *args):
    code, out, err = run(capsys, "divergence", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def expected(x, y, **kwargs):
    return float(ota.sinkhorn_divergence(x, y, **kwargs))


# --------------------------------------------------------------------------- writers


def write_ascii_ply(path, points):
    """An ASCII PLY with an extra colour property and a face element after the vertices."""
    header = [
        "ply", "format ascii 1.0", "comment written by test_cli", f"element vertex {len(points)}",
        "property double x", "property double y", "property double z", "property uchar red",
        "element face 1", "property list uchar int vertex_indices", "end_header",
    ]
    rows = [f"{x!r} {y!r} {z!r} 255" for x, y, z in points.tolist()]
    path.write_text("\n".join(header + rows + ["3 0 1 2"]) + "\n")


def write_binary_ply(path, points, endian="<", code="d", count=None):
    """A binary PLY (``endian`` "<" or ">", coordinates of struct type ``code``) with a
    uchar property between y and z and a face element; ``count`` overrides the header's."""
    fmt = {"<": "binary_little_endian", ">": "binary_big_endian"}[endian]
    ply_type = {"d": "double", "f": "float", "i": "int"}[code]
    header = (
        f"ply\nformat {fmt} 1.0\nelement vertex {count or len(points)}\n"
        f"property {ply_type} x\nproperty {ply_type} y\nproperty uchar flag\nproperty {ply_type} z\n"
        "element face 1\nproperty list uchar int vertex_indices\nend_header\n"
    ).encode()
    body = b"".join(struct.pack(f"{endian}{code}{code}B{code}", x, y, 7, z) for x, y, z in points)
    face = struct.pack(f"{endian}B3i", 3, 0, 1, 2)
    path.write_bytes(header + body + face)


# --------------------------------------------------------------------------- formats


def test_npy_value_matches_the_library(capsys, files, clouds):
    report = run_json(capsys, *files)
    assert report["value"] == pytest.approx(expected(*clouds), rel=1e-12)
    assert report["value"] > 0.01  # the clouds differ: a zero would also be "close"


def test_plain_output_format(capsys, files, clouds):
    code, out, err = run(capsys, "divergence", *files)
    assert code == 0 and err == ""
    match = re.fullmatch(r"S_eps = (\S+) \((\w+/\w+), (\d+\.\d\d) s\)\n", out)
    assert match, out
    assert float(match[1]) == pytest.approx(expected(*clouds), rel=1e-7)


def test_one_dimensional_npy_is_a_column(capsys, tmp_path, clouds):
    x, y = clouds[0][:, 0], clouds[1][:, 0]
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    report = run_json(capsys, tmp_path / "a.npy", tmp_path / "b.npy")
    assert report["dim"] == 1
    assert report["value"] == pytest.approx(expected(x[:, None], y[:, None]), rel=1e-12)


def test_csv_with_header_and_whitespace_txt(capsys, tmp_path, clouds):
    x, y = clouds
    np.savetxt(tmp_path / "a.csv", x, delimiter=",", header="x,y,z", comments="")
    lines = [f"{u!r}\t{v!r}   {w!r}  # point {i}" for i, (u, v, w) in enumerate(y.tolist())]
    (tmp_path / "b.txt").write_text("# a comment line\n\n" + "\n".join(lines) + "\n")
    report = run_json(capsys, tmp_path / "a.csv", tmp_path / "b.txt")
    assert (report["n_a"], report["n_b"], report["dim"]) == (N, M, 3)
    assert report["value"] == pytest.approx(expected(x, y), rel=1e-12)


def test_semicolon_csv(capsys, tmp_path, files, clouds):
    x, y = clouds
    np.savetxt(tmp_path / "a.csv", x, delimiter=" ; ")
    report = run_json(capsys, tmp_path / "a.csv", files[1])
    assert report["value"] == pytest.approx(expected(x, y), rel=1e-12)


def test_ascii_ply(capsys, tmp_path, files, clouds):
    x, y = clouds
    write_ascii_ply(tmp_path / "a.ply", x)
    report = run_json(capsys, tmp_path / "a.ply", files[1])
    assert report["value"] == pytest.approx(expected(x, y), rel=1e-12)


@pytest.mark.parametrize("endian, code", [("<", "d"), (">", "f"), ("<", "i")])
def test_binary_ply(capsys, tmp_path, files, clouds, endian, code):
    x, y = clouds
    points = (100 * x).round().astype(int) if code == "i" else x
    write_binary_ply(tmp_path / "a.ply", points.tolist(), endian, code)
    stored = points.astype(np.float32 if code == "f" else np.float64).astype(np.float64)
    if code == "i":  # integer coordinates: compare against the same integers as floats
        y = 100 * y
        np.save(files[1], y)
    blur = 5.0 if code == "i" else 0.05  # the same blur relative to the (100x) larger clouds
    report = run_json(capsys, tmp_path / "a.ply", files[1], "--blur", blur)
    assert report["n_a"] == N
    assert report["value"] == pytest.approx(expected(stored, y, blur=blur), rel=1e-12)


def test_ply_with_list_properties_and_faces_first(tmp_path):
    """Elements before the vertices, and a list property inside them, in ASCII and binary."""
    points = np.random.default_rng(2).random((4, 3))
    header = (
        "ply\r\nformat {} 1.0\r\nelement face 2\r\nproperty list uchar int idx\r\n"
        "element vertex 4\r\nproperty double x\r\nproperty double y\r\n"
        "property list uchar ushort tags\r\nproperty double z\r\nend_header\r\n"
    )
    body = struct.pack(">B3iB2i", 3, 0, 1, 2, 2, 0, 1)
    for i, (x, y, z) in enumerate(points.tolist()):
        body += struct.pack(f">ddB{i}Hd", x, y, i, *range(i), z)
    (tmp_path / "big.ply").write_bytes(header.format("binary_big_endian").encode() + body)
    lines = [f"{x!r} {y!r} {' '.join(map(str, [i, *range(i)]))} {z!r}" for i, (x, y, z) in enumerate(points.tolist())]
    ascii_ply = header.format("ascii") + "3 0 1 2\n2 0 1\n" + "\n".join(lines) + "\n"
    (tmp_path / "ascii.ply").write_text(ascii_ply)
    for name in ("big.ply", "ascii.ply"):  # exact: raw doubles, or repr() which round-trips
        np.testing.assert_array_equal(read_points(tmp_path / name)[0], points)
    (tmp_path / "cut.ply").write_bytes(header.format("binary_big_endian").encode() + body[:-4])
    with pytest.raises(PointCloudError, match="cut.ply: truncated: the data ends inside vertex 3"):
        read_points(tmp_path / "cut.ply")
    (tmp_path / "bad.ply").write_text(ascii_ply.replace(" 2 0 1 ", " 3 0 1 "))
    with pytest.raises(PointCloudError, match="line 15 does not match the vertex properties"):
        read_points(tmp_path / "bad.ply")


# --------------------------------------------------------------------------- options


def weighted_csv(path, points, weights, column=1):
    np.savetxt(path, np.insert(points, column, weights, axis=1), delimiter=",")


def test_weights_column(capsys, tmp_path, clouds):
    x, y = clouds
    rng = np.random.default_rng(1)
    a, b = rng.random(N) ** 4, rng.random(M)
    a, b = a / a.sum(), b / b.sum()
    weighted_csv(tmp_path / "a.csv", x, a)
    weighted_csv(tmp_path / "b.csv", y, b)
    report = run_json(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--weights-column", 1)
    assert report["dim"] == 3
    assert report["value"] == pytest.approx(expected(x, y, a=a, b=b), rel=1e-10)
    assert abs(report["value"] - expected(x, y)) > 1e-3 * expected(x, y)  # the weights matter


def test_unequal_masses_need_reach(capsys, tmp_path, clouds):
    x, y = clouds
    a, b = np.full(N, 1.0 / N), np.full(M, 2.0 / M)
    weighted_csv(tmp_path / "a.csv", x, a, column=3)
    weighted_csv(tmp_path / "b.csv", y, b, column=3)
    code, out, err = run(capsys, "divergence", tmp_path / "a.csv", tmp_path / "b.csv", "--weights-column", -1)
    assert code == 2 and out == ""
    assert "equal total masses" in err and "reach" in err and "Traceback" not in err
    report = run_json(capsys, tmp_path / "a.csv", tmp_path / "b.csv", "--weights-column", 3, "--reach", 0.5)
    assert report["reach"] == 0.5
    assert report["value"] == pytest.approx(expected(x, y, a=a, b=b, reach=0.5), rel=1e-10)


def test_json_keys_and_solver_options(capsys, files, clouds):
    args = ("--p", 1, "--blur", 0.1, "--scaling", 0.8, "--backend", "tensorized")
    report = run_json(capsys, *files, *args)
    assert set(report) >= {"value", "backend", "seconds", "n_a", "n_b", "dim", "p", "blur", "reach",
                           "file_a", "file_b", "n_iter", "dtype"}
    assert (report["n_a"], report["n_b"], report["dim"], report["p"], report["blur"]) == (N, M, 3, 1, 0.1)
    assert report["reach"] is None and report["backend"] == "array_api/tensorized"
    assert report["file_a"] == str(files[0]) and report["seconds"] >= 0
    value = expected(*clouds, p=1, blur=0.1, scaling=0.8, backend="tensorized")
    assert report["value"] == pytest.approx(value, rel=1e-12)
    assert report["value"] != pytest.approx(expected(*clouds), rel=1e-3)


def test_backend_and_dtype(capsys, files, clouds):
    x, y = clouds
    report = run_json(capsys, *files, "--backend", "multiscale", "--dtype", "float32")
    assert report["backend"] == "numba/multiscale" and report["dtype"] == "float32"
    value = expected(x.astype(np.float32), y.astype(np.float32), backend="multiscale")
    assert report["value"] == pytest.approx(value, rel=1e-6)


def test_progress_bar(capsys, files):
    code, out, err = run(capsys, "divergence", *files, "--progress")
    assert code == 0 and out.startswith("S_eps = ")
    assert "sinkhorn (numba/" in err and "step" in err
    code, out, err = run(capsys, "divergence", *files, "--no-progress")
    assert code == 0 and err == ""


@pytest.mark.parametrize("tty", [True, False])
def test_default_progress_needs_a_large_problem_on_a_terminal(capsys, monkeypatch, files, tty):
    monkeypatch.setattr(cli, "AUTO_PROGRESS_PAIRS", N * M)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    code, _, err = run(capsys, "divergence", *files)
    assert code == 0
    assert ("sinkhorn (" in err) is tty


# --------------------------------------------------------------------------- errors


def npy(array):
    return lambda path: np.save(path, array)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_npz(path, array):
    with open(path, "wb") as file:  # np.savez would append ".npz" to a name
        np.savez(file, array)


def text(content):
    return lambda path: path.write_text(content)


PLY_XY = "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nend_header\n1 2\n3 4\n"
PLY_SHORT = PLY_XY.replace("property float y\n", "property float y\nproperty float z\n")
BAD_FILES = {
    "missing.npy": (None, "no such file"),
    "points.dat": (text("1 2 3\n"), "unsupported file type '.dat'"),
    "cell.csv": (text("x,y,z\n1,2,3\n4,abc,6\n"), "line 3, column 2: not a number: 'abc'"),
    "ragged.csv": (text("1,2,3\n4,5,6\n7,8,9\n1,2\n"), "line 4 has 2 columns, expected 3"),
    "blank.csv": (text("1,,3\n"), "line 1, column 2 is empty"),
    "empty.csv": (text(""), "empty file"),
    "comments.txt": (text("# only a comment\n\n"), "no data"),
    "header.csv": (text("x,y,z\n"), "no data rows after the header"),
    "nan.txt": (text("1 2 3\n4 nan 6\n"), "line 2, column 2: non-finite value nan"),
    "inf.npy": (npy(np.array([[0.0, 1.0], [np.inf, 2.0]])), "index [1, 0]: non-finite value inf"),
    "cube.npy": (npy(np.zeros((2, 3, 4))), "expected an (N, D) array, got shape (2, 3, 4)"),
    "none.npy": (npy(np.zeros((0, 3))), "contains no points"),
    "objects.npy": (npy(np.array([{}, {}], dtype=object)), "pickled data are not loaded"),
    "garbage.npy": (text("not an array\n"), "not a .npy file (no NumPy header)"),
    "cut.npy": (lambda path: path.write_bytes(npy_bytes(np.ones((5, 3)))[:-8]), "not a valid .npy file"),
    "archive.npy": (lambda path: write_npz(path, np.ones(3)), "is an .npz archive"),
    "complex.npy": (npy(np.ones((3, 2), dtype=complex)), "expected real numbers"),
    "noxyz.ply": (text(PLY_XY), "no z property (found: x, y)"),
    "short.ply": (text(PLY_SHORT), "line 8 has 2 values, expected 3"),
    "fewer.ply": (text(PLY_SHORT.replace("vertex 2", "vertex 3").replace("1 2\n3 4\n", "1 2 3\n")),
                  "truncated: the header declares 3 vertices, the file has 1"),
    "novertex.ply": (text("ply\nformat ascii 1.0\nelement face 0\nend_header\n"), "no 'vertex' element"),
    "notply.ply": (text("hello\n"), "not a PLY file"),
    "badheader.ply": (text("ply\nformat ascii 1.0\nelement vertex two\nend_header\n"),
                      "PLY header line 3 is not valid"),
    "truncated.ply": (lambda path: write_binary_ply(path, [[0.0, 1.0, 2.0]] * 5, count=10),
                      "truncated: the vertex element needs 250 bytes"),
    "nanbin.ply": (lambda path: write_binary_ply(path, [[0.0, 1.0, 2.0], [0.0, float("nan"), 0.0]]),
                   "vertex 1, y: non-finite value nan"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
@pytest.mark.parametrize("position", [0, 1])
def test_bad_file_is_one_line_and_exit_2(capsys, tmp_path, files, name, position):
    writer, problem = BAD_FILES[name]
    if writer is not None:
        writer(tmp_path / name)
    args = [files[0], tmp_path / name]
    code, out, err = run(capsys, "divergence", *(args if position else args[::-1]))
    assert code == 2 and out == ""
    assert err.startswith(f"ot-agnostic: error: {tmp_path / name}: ")
    assert err.count("\n") == 1 and problem in err and "Traceback" not in err


def test_directory_and_weight_errors(capsys, tmp_path, files, clouds):
    def error(*args):
        code, out, err = run(capsys, "divergence", *args)
        assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err
        return err

    (tmp_path / "dir.csv").mkdir()
    assert f"{tmp_path / 'dir.csv'}: is a directory" in error(tmp_path / "dir.csv", files[1])
    assert "out of range: the table has 3 columns" in error(*files, "--weights-column", 3)
    write_ascii_ply(tmp_path / "a.ply", clouds[0])
    assert "not to PLY files" in error(tmp_path / "a.ply", files[1], "--weights-column", 0)
    weighted_csv(tmp_path / "neg.csv", clouds[1], np.linspace(-1, 1, M))
    assert "neg.csv: negative weight -1 in column 1 (data row 1)" in error(
        files[0], tmp_path / "neg.csv", "--weights-column", 1
    )


def test_mismatched_dimensions(capsys, tmp_path, files, clouds):
    np.save(tmp_path / "flat.npy", clouds[1][:, :2])
    code, out, err = run(capsys, "divergence", files[0], tmp_path / "flat.npy")
    assert code == 2 and out == ""
    assert err == f"ot-agnostic: error: {files[0]} has 3 coordinates per point but {tmp_path / 'flat.npy'} has 2\n"


@pytest.mark.parametrize("option, problem", [
    (["--blur", "0"], "argument --blur: must be a finite positive number, got 0"),
    (["--blur", "-1"], "argument --blur: must be a finite positive number"),
    (["--blur", "nan"], "argument --blur: must be a finite positive number"),
    (["--blur", "x"], "argument --blur: invalid number value: 'x'"),
    (["--reach", "0"], "argument --reach: must be a finite positive number"),
    (["--p", "3"], "argument --p: invalid choice: 3"),
    (["--scaling", "1"], "argument --scaling: must be in (0, 1)"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--backend", "bogus"], "unknown backend 'bogus'"),
    (["--backend", "keops"], "'keops' backend runs torch"),
    (["--unknown"], "unrecognized arguments: --unknown"),
])
def test_bad_option_is_one_line_and_exit_2(capsys, files, option, problem):
    code, out, err = run(capsys, "divergence", *files, *option)
    assert code == 2 and out == ""
    assert err.startswith("ot-agnostic") and problem in err
    assert err.count("\n") == 1 and "Traceback" not in err


# --------------------------------------------------------------------------- program


def test_version_help_and_no_subcommand(capsys):
    assert run(capsys, "--version")[:2] == (0, f"ot-agnostic {ota.__version__}\n")
    code, out, err = run(capsys)
    assert code == 2 and out == "" and "usage: ot-agnostic" in err and "divergence" in err
    code, out, _ = run(capsys, "divergence", "--help")
    assert code == 0 and "S_eps = <value> (<backend>, <seconds> s)" in out and ".ply" in out


def test_demo_runs_with_its_arguments(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ot", None)  # the demo skips its POT check (3 s of imports)
    code, out, err = run(capsys, "demo", "--n", 100)
    assert code == 0, err
    assert "N = M = 100 points per cloud" in out
    assert re.search(r"sphere vs translated sphere +sinkhorn_divergence\(blur=0.05\) +numpy +0\.04", out)
    assert "total compute time" in out and "POT is not installed" in out
    assert sys.argv[0] != "ot-agnostic demo"  # restored
    code, out, err = run(capsys, "demo", "--n", "many")
    assert code == 2 and "usage: demo.py" in err and "argument --n" in err


def test_demo_missing(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "demo_path", lambda: tmp_path / "examples" / "demo.py")
    code, out, err = run(capsys, "demo")
    assert code == 2 and out == ""
    assert str(tmp_path / "examples" / "demo.py") in err and err.count("\n") == 1


def test_entry_point_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["ot-agnostic"].partition(":")
    assert (module, name) == ("ot_agnostic.cli", "main")
    assert cli.DIVERGENCE_EPILOG and callable(getattr(cli, name))


def python(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_module_runs_as_a_program(files, clouds):
    result = python("-m", "ot_agnostic.cli", "divergence", *map(str, files), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["value"] == pytest.approx(expected(*clouds), rel=1e-12)
    result = python("-m", "ot_agnostic.cli", "divergence", str(files[0]), "missing.csv")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "ot-agnostic: error: missing.csv: no such file\n"


def test_cli_is_not_imported_by_the_package_and_imports_no_torch(files):
    code = (
        "import sys, ot_agnostic; assert 'ot_agnostic.cli' not in sys.modules; "
        "from ot_agnostic.cli import main; "
        f"code = main(['divergence', {str(files[0])!r}, {str(files[1])!r}]); "
        "print(code, 'torch' in sys.modules)"
    )
    result = python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 False"


# ----------------------------------------------------------------------------------------
# grid-divergence
# ----------------------------------------------------------------------------------------


def _grid_files(tmp_path, scale_b=1.0):
    rng = np.random.default_rng(3)
    a, b = rng.random((12, 10)), rng.random((12, 10))
    a, b = a / a.sum(), scale_b * b / b.sum()
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return a, b, str(tmp_path / "a.npy"), str(tmp_path / "b.npy")


def test_grid_divergence_prints_the_library_value(tmp_path, capsys):
    """The CLI calls grids.sinkhorn on the same arrays: same value to float64 round-off."""
    from ot_agnostic import grids

    a, b, file_a, file_b = _grid_files(tmp_path)
    expected = float(grids.sinkhorn_divergence(a, b, blur=1.5, spacing=(0.5, 2.0), tol=1e-6))
    assert cli.main(["grid-divergence", file_a, file_b, "--blur", "1.5", "--spacing", "0.5", "2.0",
                     "--tol", "1e-6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["value"] == pytest.approx(expected, rel=1e-12)
    assert report["converged"] and report["marginal_error"] <= 1e-6 and report["shape"] == [12, 10]
    assert cli.main(["grid-divergence", file_a, file_b, "--blur", "1.5", "--spacing", "0.5", "2.0"]) == 0
    assert re.match(r"S_eps = [0-9.e-]+ \(grid 12x10, [0-9.]+ s\)", capsys.readouterr().out)


def test_grid_divergence_bad_input_is_one_line(tmp_path, capsys):
    _, _, file_a, file_b = _grid_files(tmp_path, scale_b=2.0)
    assert cli.main(["grid-divergence", file_a, file_b, "--blur", "1.0"]) == 2
    assert "equal total masses" in capsys.readouterr().err
    assert cli.main(["grid-divergence", file_a, file_b, "--blur", "1.0", "--spacing", "1", "1", "1"]) == 2
    assert "spacing" in capsys.readouterr().err
    assert cli.main(["grid-divergence", file_a, str(tmp_path / "missing.npy"), "--blur", "1.0"]) == 2
    assert "missing.npy" in capsys.readouterr().err
    (tmp_path / "a.csv").write_text("1,2\n")
    assert cli.main(["grid-divergence", str(tmp_path / "a.csv"), file_b, "--blur", "1.0"]) == 2
    assert ".npy" in capsys.readouterr().err
    assert cli.main(["grid-divergence", file_a, file_b]) == 2
    assert "--blur" in capsys.readouterr().err
