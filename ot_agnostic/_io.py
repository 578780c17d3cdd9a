"""Point-cloud readers for the command line: ``.npy``, delimited text and PLY files.

Every reader returns a finite float64 ``(N, K)`` table with ``N >= 1`` rows, or raises
:class:`PointCloudError`, whose one-line message names the file and the problem.
Only NumPy is used.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".xyz")
SUFFIXES = (".npy", *TEXT_SUFFIXES, ".ply")

#: PLY property types (both spellings of the specification) as NumPy type codes.
PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


class PointCloudError(ValueError):
    """A point-cloud file that cannot be used; the message reads ``"<file>: <problem>"``."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


def read_points(path, weights_column=None):
    """Read a point cloud, and optionally its sample weights, from a file.

    Parameters
    ----------
    path : str or Path
        A ``.npy`` array (``(N, D)``, or ``(N,)`` read as ``(N, 1)``), a ``.csv``, ``.tsv``,
        ``.txt`` or ``.xyz`` table (comma, semicolon or whitespace delimited, ``#`` comments,
        an optional header line of column names), or a ``.ply`` mesh (ASCII or binary; the
        ``x``, ``y``, ``z`` properties of its ``vertex`` element).
    weights_column : int, optional
        Tables only (not PLY): the 0-based column holding the sample weights (negative
        counts from the end), removed from the coordinates.

    Returns
    -------
    points : ndarray, shape (N, D), float64
    weights : ndarray, shape (N,), float64, or None when ``weights_column`` is None

    Raises
    ------
    PointCloudError
        If the file is missing, unreadable, malformed, empty or holds NaN/inf values.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        kind = f"'{path.suffix}'" if path.suffix else "(no extension)"
        raise PointCloudError(path, f"unsupported file type {kind}; expected {', '.join(SUFFIXES)}")
    if suffix == ".ply" and weights_column is not None:
        raise PointCloudError(path, "a weights column applies to .npy and text tables, not to PLY files")
    data = _read_bytes(path)
    if suffix == ".npy":
        table = _parse_npy(path, data)
    elif suffix == ".ply":
        table = _parse_ply(path, data)
    else:
        table = _parse_text(path, data)
    if weights_column is None:
        return table, None
    return _split_weights(path, table, weights_column)


# --------------------------------------------------------------------------- shared helpers


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PointCloudError(path, "no such file") from None
    except IsADirectoryError:
        raise PointCloudError(path, "is a directory, not a file") from None
    except OSError as err:
        raise PointCloudError(path, f"cannot read the file ({err.strerror or err})") from None
    if not data:
        raise PointCloudError(path, "empty file")
    return data


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _check_table(path, table, where):
    """``table`` if it has points and only finite values; ``where(row, col)`` names a cell."""
    if table.shape[0] == 0:
        raise PointCloudError(path, "contains no points")
    bad = np.argwhere(~np.isfinite(table))
    if bad.size:
        row, col = bad[0]
        raise PointCloudError(path, f"{where(row, col)}: non-finite value {float(table[row, col])!r}")
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _to_floats(path, rows):
    """``rows``, a list of ``(line number, fields)`` of equal length, as a checked float table."""
    flat = [field for _, fields in rows for field in fields]
    try:
        table = np.array(flat, dtype=np.float64).reshape(len(rows), len(rows[0][1]) if rows else 0)
    except ValueError:
        for line, fields in rows:
            for col, field in enumerate(fields, 1):
                if not field:
                    raise PointCloudError(path, f"line {line}, column {col} is empty") from None
                if not _is_number(field):
                    raise PointCloudError(path, f"line {line}, column {col}: not a number: {field!r}") from None
        raise
    return _check_table(path, table, lambda r, c: f"line {rows[r][0]}, column {c + 1}")


def _check_widths(path, rows, expected, word="column"):
    for line, fields in rows:
        if len(fields) != expected:
            raise PointCloudError(path, f"line {line} has {_plural(len(fields), word)}, expected {expected}")


def _split_weights(path, table, column: int):
    width = table.shape[1]
    if not -width <= column < width:
        raise PointCloudError(path, f"weights column {column} is out of range: the table has {_plural(width, 'column')}")
    if width == 1:
        raise PointCloudError(path, "the table has a single column: no coordinates are left besides the weights")
    column %= width
    weights = table[:, column]
    negative = np.flatnonzero(weights < 0)
    if negative.size:
        raise PointCloudError(
            path, f"negative weight {weights[negative[0]]:g} in column {column} (data row {negative[0] + 1})"
        )
    if not weights.sum() > 0:
        raise PointCloudError(path, f"the weights in column {column} sum to zero")
    return np.delete(table, column, axis=1), weights


# --------------------------------------------------------------------------- .npy


def _parse_npy(path, data: bytes):
    if data.startswith(b"PK"):
        raise PointCloudError(path, "is an .npz archive, not a single .npy array")
    if not data.startswith(b"\x93NUMPY"):
        raise PointCloudError(path, "not a .npy file (no NumPy header)")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise PointCloudError(path, "holds Python objects (pickled data are not loaded), not numbers") from None
        raise PointCloudError(path, f"not a valid .npy file ({err})") from None
    except (OSError, EOFError) as err:
        raise PointCloudError(path, f"not a valid .npy file ({err})") from None
    kind = array.dtype.kind
    if kind not in "iuf":
        raise PointCloudError(path, f"has dtype {array.dtype}; expected real numbers (integers or floats)")
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise PointCloudError(path, f"expected an (N, D) array, got shape {array.shape}")
    table = array.astype(np.float64)
    return _check_table(path, table, lambda r, c: f"index [{r}, {c}]")


# --------------------------------------------------------------------------- text tables


def _split_fields(line: str, delimiter):
    if delimiter is None:
        return line.split()
    return [field.strip() for field in line.split(delimiter)]


def _parse_text(path, data: bytes):
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PointCloudError(path, f"not a text file (byte {err.start} is not UTF-8)") from None
    content = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if line:
            content.append((number, line))
    if not content:
        raise PointCloudError(path, "no data (only blank lines or comments)")
    first = content[0][1]
    delimiter = ";" if ";" in first else "," if "," in first else None
    rows = [(number, _split_fields(line, delimiter)) for number, line in content]
    if not any(_is_number(field) for field in rows[0][1]):  # a header line of column names
        rows = rows[1:]
        if not rows:
            raise PointCloudError(path, "no data rows after the header line")
    _check_widths(path, rows, len(rows[0][1]))
    return _to_floats(path, rows)


# --------------------------------------------------------------------------- PLY


def _ply_header(path, data: bytes):
    """``(format, elements, body offset)``: each element is ``(name, count, properties)``,
    a property ``(name, type code)`` or, for a list, ``(name, (count code, item code))``."""
    fmt, elements, pos, number = None, [], 0, 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            raise PointCloudError(path, "the PLY header has no 'end_header' line")
        line = data[pos:end].decode("latin-1").strip()
        words, pos, number = line.split(), end + 1, number + 1
        if number == 1:
            if line != "ply":
                raise PointCloudError(path, "not a PLY file (the first line is not 'ply')")
            continue
        key = words[0] if words else "comment"
        if key in ("comment", "obj_info"):
            continue
        if key == "end_header":
            break
        try:
            if key == "format":
                fmt = words[1]
                if fmt not in PLY_FORMATS or len(words) != 3:
                    raise ValueError
            elif key == "element":
                name, count = words[1], int(words[2])
                if len(words) != 3 or count < 0:
                    raise ValueError
                elements.append((name, count, []))
            elif key == "property" and elements:
                if words[1] == "list":
                    prop = (words[4], (PLY_TYPES[words[2]], PLY_TYPES[words[3]]))
                    if len(words) != 5:
                        raise ValueError
                else:
                    prop = (words[2], PLY_TYPES[words[1]])
                    if len(words) != 3:
                        raise ValueError
                elements[-1][2].append(prop)
            else:
                raise ValueError
        except (ValueError, IndexError, KeyError):
            raise PointCloudError(path, f"PLY header line {number} is not valid: {line!r}") from None
    if fmt is None:
        raise PointCloudError(path, "the PLY header has no 'format' line")
    return fmt, elements, pos


def _parse_ply(path, data: bytes):
    fmt, elements, body = _ply_header(path, data)
    vertex = next((element for element in elements if element[0] == "vertex"), None)
    if vertex is None:
        raise PointCloudError(path, "the PLY file has no 'vertex' element")
    scalars = [name for name, kind in vertex[2] if isinstance(kind, str)]
    missing = [axis for axis in "xyz" if axis not in scalars]
    if missing:
        found = ", ".join(name for name, _ in vertex[2]) or "none"
        raise PointCloudError(path, f"the PLY vertex element has no {'/'.join(missing)} property (found: {found})")
    if fmt == "ascii":
        start = data[:body].count(b"\n") + 1
        return _ply_ascii(path, data[body:].decode("latin-1"), start, elements)
    table = _ply_binary(path, data, body, elements, PLY_FORMATS[fmt])
    return _check_table(path, table, lambda r, c: f"vertex {r}, {'xyz'[c]}")


def _ply_ascii(path, body: str, start: int, elements):
    lines = [(n, line.split()) for n, line in enumerate(body.splitlines(), start) if line.strip()]
    skip = 0
    for name, count, props in elements:
        if name != "vertex":
            skip += count
            continue
        rows = lines[skip:skip + count]
        if len(rows) < count:
            raise PointCloudError(path, f"truncated: the header declares {count} vertices, the file has {len(rows)}")
        if all(isinstance(kind, str) for _, kind in props):
            _check_widths(path, rows, len(props), "value")
            names = [name for name, _ in props]
            columns = [names.index(axis) for axis in "xyz"]
            rows = [(n, [fields[c] for c in columns]) for n, fields in rows]
        else:
            rows = [(n, _ascii_xyz(path, n, props, fields)) for n, fields in rows]
        return _to_floats(path, rows)


def _ascii_xyz(path, line, props, fields):
    """The x, y, z fields of one ASCII vertex line with list properties."""
    values, i = {}, 0
    try:
        for name, kind in props:
            if isinstance(kind, str):
                values[name] = fields[i]
                i += 1
            elif int(fields[i]) >= 0:
                i += 1 + int(fields[i])
            else:
                raise ValueError
    except (IndexError, ValueError):
        i = -1
    if i != len(fields):
        raise PointCloudError(path, f"line {line} does not match the vertex properties of the header")
    return [values[axis] for axis in "xyz"]


def _ply_binary(path, data: bytes, offset: int, elements, endian: str):
    for name, count, props in elements:
        if all(isinstance(kind, str) for _, kind in props):
            dtype = np.dtype([(f"p{k}", endian + kind) for k, (_, kind) in enumerate(props)])
            size = dtype.itemsize * count
            if offset + size > len(data):
                raise PointCloudError(
                    path, f"truncated: the {name} element needs {size} bytes, the file has {len(data) - offset} left"
                )
            if name == "vertex":
                records = np.frombuffer(data, dtype, count, offset)
                names = [prop for prop, _ in props]
                return np.stack([records[f"p{names.index(axis)}"] for axis in "xyz"], 1).astype(np.float64)
            offset += size
            continue
        rows = []
        for index in range(count):
            values, offset = _binary_instance(path, data, offset, props, endian, f"{name} {index}")
            rows.append([values.get(axis, 0.0) for axis in "xyz"])
        if name == "vertex":
            return np.array(rows, dtype=np.float64).reshape(count, 3)


def _binary_instance(path, data: bytes, offset: int, props, endian: str, what: str):
    """The scalar values of one binary element instance with list properties, and the next offset."""
    values = {}

    def read(code, n=1):
        nonlocal offset
        dtype = np.dtype(endian + code)
        if n < 0:
            raise PointCloudError(path, f"negative list length in {what}")
        if offset + dtype.itemsize * n > len(data):
            raise PointCloudError(path, f"truncated: the data ends inside {what}")
        out = np.frombuffer(data, dtype, n, offset)
        offset += dtype.itemsize * n
        return out

    for name, kind in props:
        if isinstance(kind, str):
            values[name] = float(read(kind)[0])
        else:
            read(kind[1], int(read(kind[0])[0]))
    return values, offset
