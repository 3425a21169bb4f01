#!/usr/bin/env python3
"""Derive the names the TensorRT Python bindings define, from a bindings wheel that cannot be imported here.

    python tests/tensorrt_names.py tensorrt_cu12_bindings-VERSION-...whl > tests/data/tensorrt_api_names.txt

(also accepts the unpacked tensorrt.so, with its __init__.py read from beside it when present).

pybind11 registers every class, method, property and enum member under a C string that the linker
stores in .rodata; the names are those strings. Two rules keep the list faithful to the binary:
- a name counts when it is a whole NUL-terminated identifier string (`execute_async_v3`);
- the linker merges a string that ends another one into it ("num_errors" lives inside
  "get_num_errors"), so a suffix of a whole identifier also counts when it starts at a word
  boundary: after '_' or at a camel-case capital ("ILogger" -> "Logger"). This admits some
  suffixes that are not names; it never drops a name the bindings define.
The pure-Python layer (`__init__.py`: `__version__`, `volume`, `nptype`, `DataType.itemsize`) is
added from its AST. Mangled C++ symbols (`_Z...`) are left out.
"""

from __future__ import annotations

import ast
import re
import sys
import zipfile
from pathlib import Path

# Names the bindings define that the rule above cannot see: the linker stored the string inside a longer one
# with no word boundary before it. Each is checked against NVIDIA's documentation, cited here.
DOCUMENTED = {
    # inside "unset_named_weights" ("un|set_..."); Refitter.set_named_weights(name, weights[, location]):
    # docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/infer/Core/Refitter.html and the 11.4.0
    # "Refitting an Engine" page (refitter.set_named_weights("Conv Layer Kernel Weights", new_weights))
    "set_named_weights",
}

_WHOLE = re.compile(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]*(?=\x00)")


def _suffixes(name: str) -> set[str]:
    """Word-boundary suffixes of `name` (after '_' or at a camel-case capital)."""
    out = set()
    for i in range(1, len(name)):
        prev, ch, nxt = name[i - 1], name[i], name[i + 1:i + 2]
        boundary = prev == "_" or (ch.isupper() and (not prev.isupper() or nxt.islower()))
        if boundary and (ch.isalpha() or ch == "_"):
            out.add(name[i:])
    return out


def names_from_binary(data: bytes) -> set[str]:
    whole = {m.decode() for m in _WHOLE.findall(data)}
    whole = {n for n in whole if not n.startswith("_Z") and len(n) >= 2}
    names = set(whole)
    for n in whole:
        names.update(s for s in _suffixes(n) if len(s) >= 2)
    return names


def names_from_init(source: str) -> set[str]:
    """Top-level names and attribute assignments (`DataType.itemsize = ...`) of the package __init__."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    names.add(t.id)
                elif isinstance(t, ast.Attribute):
                    names.add(t.attr)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr":
            continue  # setattr(Logger, attr, value): members of ILogger.Severity, already in the binary
    return names


def read_wheel(path: Path) -> tuple[bytes, str, str]:
    """(tensorrt.so bytes, __init__.py source, version) from a bindings wheel, or an unpacked .so."""
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            so = next(n for n in z.namelist() if re.search(r"/tensorrt[^/]*\.so$", n))
            init = z.read(str(Path(so).parent / "__init__.py")).decode()
            return z.read(so), init, _version(init)
    init_path = path.parent / "__init__.py"
    init = init_path.read_text() if init_path.is_file() else ""
    return path.read_bytes(), init, _version(init)


def _version(init: str) -> str:
    m = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", init)
    return m.group(1) if m else "unknown"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    path = Path(argv[0])
    data, init, version = read_wheel(path)
    names = names_from_binary(data) | names_from_init(init)
    names |= {n for n in DOCUMENTED if n not in names and any(m.endswith(n) for m in names)}
    print(f"# TensorRT {version} Python API names, from {path.name}")
    print(f"# derived by: python tests/tensorrt_names.py {path.name} > tests/data/tensorrt_api_names.txt")
    print("# rule: whole identifier strings of the bindings .so, their word-boundary suffixes "
          "(linker tail merging), __init__.py's names, and DOCUMENTED names hidden by tail merging; see "
          "tests/tensorrt_names.py")
    for n in sorted(names):
        print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
