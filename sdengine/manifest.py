"""The manifest of an exported ONNX folder, and the checks a folder passes before any graph is loaded.

`manifest.json` stamps the folder with what makes it stale (DESIGN.md, rules of thumb): the sdengine
version, the model config, precision, opset, shape ranges, the source weights' hash and the sha256
of every graph and external-data file. No torch here: the runtime reads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ModelLoadError, UnsupportedModelError
from .specs import Precision, ShapeRanges, spec_of

FORMAT, FORMAT_VERSION = "sdengine-onnx", 3  # 2: the denoise step takes a sampler state; 3: prompt chunks
MANIFEST, REPORT, TOKENIZER_DIR = "manifest.json", "export-report.json", "tokenizer"
TOKENIZER_2_DIR = "tokenizer_2"  # SDXL's second tokenizer (pads with '!')
META_GRAPH, META_SOURCE, META_KEY = "sdengine.graph", "sdengine.source_sha256", "sdengine.export_key"
META_INT8 = "sdengine.int8"  # the --int8 op set of a quantized graph (absent: a float graph)
_CHUNK = 1 << 22


_SAMPLES, _SAMPLE = 16, 1 << 16


def fingerprint(path: Path) -> str:
    """The cheap check made at every load: sha256 of the file's size and of 16 slices of 64 KiB spread evenly
    over it (the whole file up to 1 MiB). It notices a truncated, extended, replaced or re-exported file while
    reading 1 MiB of a 3.4 GB U-Net; the full sha256, recorded at export, is compared by `sdengine verify`."""
    size = path.stat().st_size
    h = hashlib.sha256(b"%d:" % size)
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE:
            h.update(f.read())
        else:
            for k in range(_SAMPLES):  # the first slice at 0, the last one ending at the file's end
                f.seek(k * (size - _SAMPLE) // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE))
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest records of a written file: full sha256, size and load-time fingerprint."""
    return {"sha256": sha256_file(path), "size": path.stat().st_size, "fingerprint": fingerprint(path)}


def _same_file(path: Path, record: dict[str, Any], full: bool) -> bool:
    """`path` is the file of `record`: by its fingerprint (and size), or by the full sha256 when `full` is
    asked or the record is older than fingerprints."""
    if full or not record.get("fingerprint"):
        return sha256_file(path) == record.get("sha256")
    return path.stat().st_size == record.get("size") and fingerprint(path) == record["fingerprint"]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Manifest:
    """A parsed manifest.json: the model, the export settings and one entry per graph."""

    def __init__(self, folder: Path, data: dict[str, Any]) -> None:
        self.folder = folder
        self.data = data
        try:
            self.config = ModelConfig.from_dict(data["model_config"])
            self.precision = Precision(data["precision"])
            self.ranges = ShapeRanges.from_dict(data["shapes"])
            self.graphs: dict[str, dict[str, Any]] = dict(data["graphs"])
            self.source_sha256: str = data["source"]["sha256"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{folder / MANIFEST} is incomplete ({exc!r}); re-export the folder with "
                                 f"sdengine export --force") from None

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        """Parse a folder's manifest, refusing anything that is not an sdengine ONNX export."""
        folder = Path(folder).expanduser()
        path = folder / MANIFEST
        if not folder.is_dir():
            raise ModelLoadError(f"ONNX model folder {folder} does not exist: export one with "
                                 f"sdengine export --model MODEL --out {folder}")
        if not path.is_file():
            hint = (" (it is a diffusers model folder: export it first)" if (folder / "model_index.json").is_file()
                    else "")
            raise ModelLoadError(f"{folder} has no {MANIFEST}, so it is not an sdengine ONNX export{hint}; run "
                                 f"sdengine export --model MODEL --out DIR and pass DIR")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON ({exc}); re-export the folder") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ModelLoadError(f"{path} is not an sdengine ONNX manifest; re-export the folder")
        if data.get("format_version") != FORMAT_VERSION:
            raise UnsupportedModelError(f"{path} has format version {data.get('format_version')!r}; this sdengine "
                                        f"reads version {FORMAT_VERSION}: re-export with this version")
        return cls(folder, data)

    def graph_path(self, name: str, full: bool = False) -> Path:
        """The checked path of graph `name`: listed, present, external data inside the folder, and each file
        the one exported: by size and fingerprint, or by the full sha256 when `full` (`sdengine verify`)."""
        entry = self.graphs.get(name)
        if entry is None:
            raise ModelLoadError(f"{self.folder} has no {name} graph in its manifest (its export may have failed "
                                 f"validation: see {REPORT}); re-export with sdengine export --force")
        path = self.folder / spec_of(name, self.config).file
        if entry.get("file") != path.name:
            raise ModelLoadError(f"{self.folder / MANIFEST} names {entry.get('file')!r} for {name}; expected "
                                 f"{path.name}: re-export the folder")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing from the ONNX export folder; re-export with "
                                 f"sdengine export --force")
        if not _same_file(path, {**entry, **(entry.get("files") or {}).get(path.name, {})}, full):
            raise ModelLoadError(self._mismatch(name, path))
        from .runtime.onnx_files import check_external_data

        files = check_external_data(path, self.folder)
        expected = entry.get("external_data") or {}
        if sorted(files) != sorted(expected):
            raise ModelLoadError(f"{path} refers to external data {sorted(files)}, the manifest lists "
                                 f"{sorted(expected)}: re-export the folder")
        for rel, digest in expected.items():
            if not _same_file(self.folder / rel, {"sha256": digest, **(entry.get("files") or {}).get(rel, {})}, full):
                raise ModelLoadError(f"{self.folder / rel} (external data of {path.name}) differs from the one "
                                     f"exported (sha256 mismatch); re-export the folder")
        return path

    def int8(self, name: str) -> str | None:
        """The --int8 op set graph `name` was quantized with (None: a float graph)."""
        return ((self.graphs.get(name) or {}).get("int8") or {}).get("ops")

    def verify(self) -> list[Path]:
        """Every graph's files against their full sha256 (ModelLoadError at the first that differs); the files."""
        files = []
        for name in self.graphs:
            path = self.graph_path(name, full=True)
            files += [path, *(self.folder / rel for rel in self.graphs[name].get("external_data") or {})]
        return files

    def _mismatch(self, name: str, path: Path) -> str:
        """Why a graph's sha256 differs: another model's graph, or a changed/corrupt file."""
        from .runtime.onnx_files import read_metadata

        meta = read_metadata(path)
        if meta is not None and meta.get(META_SOURCE) not in (None, self.source_sha256):
            return (f"{path} was exported from another model (source {meta[META_SOURCE][:12]}, this folder's "
                    f"manifest: {self.source_sha256[:12]}); do not mix export folders: re-export with "
                    f"sdengine export --model MODEL --out {self.folder} --force")
        return (f"{path} differs from the graph recorded in {MANIFEST} (sha256 mismatch): it was changed, "
                f"truncated or corrupted after export; re-export with sdengine export --force")
