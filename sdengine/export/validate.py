"""Checks every graph passes before it is written: onnx.checker, strict shape inference, the declared IO
against sdengine.specs, and ONNX Runtime outputs against the PyTorch reference at the shape points of
sdengine.specs.validation_points (two cheap ones by default; `full` adds the opt and the largest shape)."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..config import ModelConfig
from ..specs import INT8_TOLERANCE, MIN_PSNR_DB, TOLERANCE, VALIDATE_QUICK, GraphSpec, Precision, ShapeRanges, \
    fixed_dims, sample_inputs, trace_point, validation_points
from .wrappers import GraphModule

_SHOWN_DIMS = ("batch", "rows", "latent_height", "latent_width")


@dataclass
class GraphResult:
    """The validation record of one graph, as printed and saved in export-report.json."""

    graph: str
    precision: str
    status: str = "failed"                       # passed | failed | up to date
    validation: str = VALIDATE_QUICK             # which shape points (sdengine.specs.validation_points)
    checks: dict[str, str] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    max_rel_l2: float | None = None
    min_psnr_db: float | None = None
    tolerance: float | None = None
    psnr_floor_db: float | None = None
    seconds: float = 0.0
    error: str | None = None
    file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite(v) for k, v in self.__dict__.items()}


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    """||got - ref|| / ||ref|| in float64 (NaN when either holds a non-finite value)."""
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    if got.shape != ref.shape:
        return math.nan
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))


def psnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR of images in [-1, 1] mapped to [0, 1] after clipping, as they are saved (capped at 200 dB)."""
    a = np.clip(got.astype(np.float64) / 2 + 0.5, 0, 1)
    b = np.clip(ref.astype(np.float64) / 2 + 0.5, 0, 1)
    mse = float(np.mean((a - b) ** 2)) if a.shape == b.shape else math.nan
    return 200.0 if mse == 0 else 10 * math.log10(1.0 / mse) if math.isfinite(mse) else math.nan


def check_io(model: onnx.ModelProto, spec: GraphSpec, config: ModelConfig, static_dims: dict[str, int] | None,
             slots: int | None = None, cache_branch: int | None = None) -> None:
    """Names, element types and dimensions of the graph's inputs and outputs as the spec says."""
    fixed = fixed_dims(config, slots, cache_branch)
    for declared, wanted in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        names = [v.name for v in declared]
        if names != [t.name for t in wanted]:
            raise AssertionError(f"graph IO {names} differ from the spec's {[t.name for t in wanted]}")
        for v, t in zip(declared, wanted):
            tt = v.type.tensor_type
            if onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type) != np.dtype(t.dtype):
                raise AssertionError(f"{t.name} is {onnx.TensorProto.DataType.Name(tt.elem_type)}, spec: {t.dtype}")
            got = [d.dim_param or d.dim_value for d in tt.shape.dim]
            want = [_expected_dim(d, fixed, static_dims) for d in t.dims]
            if got != want:
                raise AssertionError(f"{t.name} has dims {got}, spec: {want}")


def _expected_dim(d: str | int, fixed: dict[str, int], static_dims: dict[str, int] | None) -> str | int:
    """A fixed size, or the symbol's name (its static size in a static export)."""
    if isinstance(d, int):
        return d
    if d in fixed:
        return fixed[d]
    return static_dims[d] if static_dims is not None else d


def structural_checks(path: Path, spec: GraphSpec, config: ModelConfig, ranges: ShapeRanges) -> dict[str, str]:
    """onnx.checker (full), strict shape inference, declared IO; raises AssertionError/onnx errors."""
    onnx.checker.check_model(str(path), full_check=True)
    checks = {"onnx.checker": "ok"}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".infer-") as tmp:
        out = Path(tmp) / path.name
        onnx.shape_inference.infer_shapes_path(str(path), str(out), check_type=True, strict_mode=True,
                                               data_prop=True)
        inferred = onnx.load(str(out), load_external_data=False)
    checks["shape_inference"] = "ok"
    check_io(inferred, spec, config, trace_point(config, ranges) if ranges.static else None, ranges.slots,
             ranges.cache_branch)
    checks["io_matches_spec"] = "ok"
    return checks


@dataclass(frozen=True)
class Reference:
    """One validation point: its shape, the random inputs drawn for it and the fp32 torch outputs."""

    dims: dict[str, int]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def references(gm: GraphModule, config: ModelConfig, ranges: ShapeRanges, seed: int,
               mode: str = VALIDATE_QUICK) -> list[Reference]:
    """The torch reference at every `mode` shape point (sdengine.specs.validation_points), on fresh random inputs.

    Computed before ONNX Runtime's session is opened, so the caller can free the torch module first: the session
    of a large graph and the module it came from are then never held at once (the export's peak memory)."""
    rng = np.random.default_rng(seed)
    points = []
    for dims in validation_points(config, ranges, mode):
        inputs = sample_inputs(gm.spec, config, dims, rng)
        points.append(Reference(dict(dims), inputs, gm.reference(inputs)))
    return points


def compare(path: Path, spec: GraphSpec, points: list[Reference], precision: Precision, result: GraphResult,
            mode: str = VALIDATE_QUICK, int8: bool = False) -> None:
    """ORT (CPU) against the fp32 references `points` (taken at the `mode` shape points); fills `result`
    (`int8`: a graph quantized by --int8, held to INT8_TOLERANCE)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result.tolerance, result.psnr_floor_db = (INT8_TOLERANCE, None) if int8 else \
        (TOLERANCE[precision], MIN_PSNR_DB[precision])
    errors, psnrs = [], []
    result.validation = mode
    for point in points:
        got = dict(zip(spec.output_names, session.run(spec.output_names, point.inputs)))
        ref = point.outputs
        outputs = {}
        for name in spec.output_names:
            entry = {"rel_l2": rel_l2(got[name], ref[name])}
            errors.append(entry["rel_l2"])
            if name == spec.image_output:
                entry["psnr_db"] = psnr_db(got[name], ref[name])
                psnrs.append(entry["psnr_db"])
            outputs[name] = entry
        shown = {k: point.dims[k] for k in _SHOWN_DIMS if any(k in t.dims for t in spec.inputs)}
        result.points.append({"dims": shown, "outputs": outputs})
    result.max_rel_l2 = max(errors, key=lambda e: math.inf if math.isnan(e) else e)
    result.min_psnr_db = min(psnrs, key=lambda p: -math.inf if math.isnan(p) else p) if psnrs else None
    ok = all(e < result.tolerance for e in errors)  # NaN compares False: fails
    if precision is Precision.FP16:
        ok = ok and all(p >= result.psnr_floor_db for p in psnrs)
    result.status = "passed" if ok else "failed"
    if not ok:
        floor = (f", min PSNR {result.min_psnr_db:.1f} dB (floor {result.psnr_floor_db:g} dB)"
                 if psnrs and result.psnr_floor_db is not None else "")
        result.error = (f"outputs differ from the reference: max relative L2 {result.max_rel_l2:.3g} "
                        f"(tolerance {result.tolerance:g})" + floor)


def format_table(results: list[GraphResult]) -> str:
    """A short fixed-width table of the results."""
    rows = [("graph", "precision", "status", "max rel L2", "tolerance", "min PSNR", "seconds")]
    for r in results:
        rows.append((r.graph, r.precision, r.status, _num(r.max_rel_l2, ".2e"), _num(r.tolerance, "g"),
                     _num(r.min_psnr_db, ".1f", " dB"), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        if r.error:
            lines.append(f"{r.graph}: {r.error}")
    return "\n".join(lines)


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{unit}"
