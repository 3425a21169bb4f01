"""Reading ONNX files safely: metadata, and external-data paths checked before anything reads them.

Uses the `onnx` package (protobuf only, no torch). A graph is parsed without its external data, so
a crafted location is refused before ONNX Runtime could open it.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import numpy as np

from ..errors import ModelLoadError


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ModelLoadError("the onnx package is not installed: pip install 'sdengine[onnx]'") from None
    return onnx


def load_proto(path: Path):
    """The ModelProto of `path` without its external data, or a ModelLoadError naming the file."""
    onnx = _onnx()
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelLoadError(f"{path} is not a valid ONNX graph ({type(exc).__name__}: {exc}); it may be truncated "
                             f"or corrupt: re-export it with sdengine export --force") from None


def read_metadata(path: Path) -> dict[str, str] | None:
    """metadata_props of a graph, or None when it cannot be parsed."""
    try:
        model = load_proto(path)
    except ModelLoadError:
        return None
    return {p.key: p.value for p in model.metadata_props}


def _tensors(graph) -> Iterator:
    """Every TensorProto of a graph: initializers and tensors inside node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def external_locations(model) -> list[str]:
    """The external-data `location` of every externally stored tensor (duplicates removed)."""
    onnx = _onnx()
    found = []
    for t in _tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            found.append(entries.get("location", ""))
    return sorted(set(found))


def _inside(location: str, folder: Path) -> bool:
    if not location or PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute() \
            or PureWindowsPath(location).drive:
        return False
    root = folder.resolve()
    target = (folder / location).resolve()
    return target != root and root in target.parents


def check_external_data(path: Path, folder: Path) -> list[str]:
    """External-data files of graph `path`, each refused unless it lies inside `folder` (never read)."""
    model = load_proto(path)
    locations = external_locations(model)
    for loc in locations:
        if not _inside(loc, folder) or not _inside(loc, path.parent):
            raise ModelLoadError(f"{path} points its external data at {loc!r}, outside the model folder {folder}; "
                                 f"refusing to read it (a graph may only use files beside it): re-export the "
                                 f"folder with sdengine export")
        if not (path.parent / loc).is_file():
            raise ModelLoadError(f"{path} needs its external data file {loc}, which is missing from {folder}; "
                                 f"copy the whole export folder or re-export it")
    return locations


def read_initializers(path: Path, names: set[str]) -> tuple[dict, frozenset[str]]:
    """({name: numpy array} of the named initializers of graph `path`, the names of all its initializers stored
    as external data). External data is read beside the graph: its locations were checked by
    check_external_data when the manifest verified the graph."""
    from onnx import numpy_helper

    onnx = _onnx()
    model = load_proto(path)
    external = frozenset(t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    found = {t.name: numpy_helper.to_array(t, base_dir=str(path.parent)) for t in model.graph.initializer
             if t.name in names}
    missing = sorted(names - set(found))
    if missing:
        raise ModelLoadError(f"{path} has no initializer(s) {', '.join(missing[:5])} that its manifest names; "
                             f"re-export the folder with sdengine export --force")
    return found, external


def with_initializers(path: Path, arrays: dict) -> bytes:
    """Graph `path`, which holds all its tensors inline, serialized with the named initializers replaced by
    `arrays` (same names, shapes and dtypes): what a session opens at every optimisation level."""
    from onnx import numpy_helper

    model = load_proto(path)
    for t in model.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))
    return model.SerializeToString()


def token_table(path: Path, folder: Path, rows: int, width: int) -> tuple[str, np.ndarray]:
    """The name and contents of the text encoder graph's token embedding table [rows, width] (an initializer, read
    from the graph or its checked external data): what textual inversion extends."""
    import numpy as np

    onnx = _onnx()
    model = load_proto(path)
    found = [t for t in model.graph.initializer if list(t.dims) == [rows, width]]
    if len(found) != 1:
        raise ModelLoadError(f"{path} has {len(found)} initializers shaped [{rows}, {width}] where one token table "
                             f"was expected: re-export it with sdengine export --force")
    (table,) = found
    dtype = onnx.helper.tensor_dtype_to_np_dtype(table.data_type)
    if table.data_location != onnx.TensorProto.EXTERNAL:
        return table.name, onnx.numpy_helper.to_array(table)
    info = {e.key: e.value for e in table.external_data}
    if not _inside(info["location"], folder):
        raise ModelLoadError(f"{path}: external data {info['location']!r} lies outside {folder}")
    values = np.fromfile(folder / info["location"], dtype=dtype, count=rows * width, offset=int(info.get("offset", 0)))
    if values.size != rows * width:
        raise ModelLoadError(f"{path}: its token table's external data is truncated; re-export it")
    return table.name, values.reshape(rows, width)
