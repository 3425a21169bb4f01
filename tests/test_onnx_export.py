"""ONNX export of the tiny model: every graph validated against the PyTorch reference before it is written."""

from __future__ import annotations

import json
import os
from unittest import mock

import numpy as np
import pytest

from diffusers_support import pixels
from onnx_support import (copy_export, onnx_fp16_dir, onnx_fp32_dir, report, run_cli,  # noqa: F401
                          tiny_components)

import onnx
import onnxruntime as ort

from sdengine.errors import InvalidInputError, SDEngineError
from sdengine.export import ExportSettings, export_model
from sdengine.manifest import Manifest, sha256_file
from sdengine.config import ModelConfig
from sdengine.specs import (GRAPHS, TOLERANCE, Precision, ShapeRanges, point_dims, sample_inputs, trace_point,
                            validation_points)

ALL = tuple(GRAPHS)
DEFAULT = tuple(g for g in ALL if g in ExportSettings().graphs)  # all but the plain U-Net (--unet-graph)
EXPORTED = {"fp32": ALL, "fp16": DEFAULT}  # onnx_support: the fp32 folder is exported with --unet-graph


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_every_graph_passes_and_is_recorded(request, precision):
    folder = request.getfixturevalue(f"onnx_{precision}_dir")
    graphs = {g["graph"]: g for g in report(folder)["graphs"]}
    assert sorted(graphs) == sorted(EXPORTED[precision]) and "unet" not in DEFAULT
    for name, g in graphs.items():
        print(f"\nparity onnx {precision} {name}: max rel L2 {g['max_rel_l2']:.2e}"
              + (f", min PSNR {g['min_psnr_db']:.1f} dB" if g["min_psnr_db"] is not None else ""))
        assert g["status"] == "passed" and g["max_rel_l2"] < TOLERANCE[Precision(precision)]
        assert g["checks"] == {"onnx.checker": "ok", "shape_inference": "ok", "io_matches_spec": "ok"}
        assert len(g["points"]) == 2 and g["points"][0]["dims"] != g["points"][1]["dims"]
        assert g["validation"] == "quick"
    assert graphs["vae_decoder"]["min_psnr_db"] >= 35
    manifest = Manifest.read(folder)
    assert manifest.precision.value == precision and manifest.ranges == ShapeRanges.default(manifest.config)
    for name in EXPORTED[precision]:
        entry = manifest.graphs[name]
        assert sha256_file(folder / entry["file"]) == entry["sha256"] and entry["external_data"] == {}
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{n}.onnx" for n in EXPORTED[precision]] + ["manifest.json", "export-report.json", "tokenizer"])


@pytest.mark.parametrize("precision, name", [(p, n) for p in EXPORTED for n in EXPORTED[p]])
def test_graph_matches_reference_at_another_shape(request, tiny_components, precision, name):
    """Independent of the exporter's own report: 3 images, 80x120 pixels (odd 15-cell latent side)."""
    from sdengine.export.validate import psnr_db, rel_l2
    from sdengine.export.wrappers import build

    folder = request.getfixturevalue(f"onnx_{precision}_dir")
    gm = build(name, tiny_components)
    dims = point_dims(tiny_components.config, 3, 10, 15, rows=5, slots=4)
    inputs = sample_inputs(gm.spec, tiny_components.config, dims,
                           np.random.default_rng(123))
    session = ort.InferenceSession(str(folder / gm.spec.file), providers=["CPUExecutionProvider"])
    got = dict(zip(gm.spec.output_names, session.run(None, inputs)))
    ref = gm.reference(inputs)
    for out in gm.spec.output_names:
        assert got[out].dtype == np.float32 and got[out].shape == ref[out].shape
        assert rel_l2(got[out], ref[out]) < TOLERANCE[Precision(precision)], out
    if gm.spec.image_output:
        assert psnr_db(got["image"], ref["image"]) >= 35


def test_fp16_graph_keeps_io_update_and_islands_fp32(onnx_fp16_dir):
    from sdengine.export.fp16 import compute_types

    model = onnx.load(str(onnx_fp16_dir / "denoise_step.onnx"))
    kinds = compute_types(model)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    by_op = {}
    for node in model.graph.node:
        if node.name.startswith("/unet/"):  # the network body; the update (a MatMul over the state) is not
            by_op.setdefault(node.op_type, set()).add(kinds[node.name])
    assert by_op["Conv"] == {"fp16"} and by_op["MatMul"] == {"fp16"}
    for op in ("InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos"):
        assert by_op[op] == {"fp32"}, op
    outside = [n for n in model.graph.node if not n.name.startswith("/unet/") and n.op_type != "Cast"]
    assert outside and all(kinds[n.name] in ("fp32", "other") for n in outside)  # guidance and update
    vae = onnx.load(str(onnx_fp16_dir / "vae_decoder.onnx"))
    vae_kinds = compute_types(vae)
    attention = [n for n in vae.graph.node if n.op_type == "MatMul" and "/attentions.0/" in n.name]
    assert {vae_kinds[n.name] for n in attention if "to_" not in n.name} == {"fp32"}  # upcast like the reference


def test_rerun_skips_up_to_date_graphs(onnx_fp32_dir, tiny_model_dir, tmp_path):
    folder = copy_export(onnx_fp32_dir, tmp_path / "copy")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")}
    results = export_model(tiny_model_dir, folder, ExportSettings(), log=lambda line: None)
    assert [r.status for r in results] == ["up to date"] * len(DEFAULT)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.onnx")} == stamps  # unet.onnx kept as well
    assert report(folder)["graphs"][0]["max_rel_l2"] is not None  # the figures are kept
    again = export_model(tiny_model_dir, folder, ExportSettings(force=True, graphs=("vae_encoder",)),
                         log=lambda line: None)
    assert [r.status for r in again] == ["passed"]
    assert (folder / "vae_decoder.onnx").stat().st_mtime_ns == stamps["vae_decoder.onnx"]


def test_failing_graph_is_not_written(tiny_model_dir, tmp_path, monkeypatch):
    from sdengine.export import validate

    monkeypatch.setattr(validate, "TOLERANCE", {p: 1e-12 for p in Precision})
    out = tmp_path / "failing"
    with pytest.raises(SDEngineError, match="vae_encoder"):
        export_model(tiny_model_dir, out, ExportSettings(graphs=("vae_encoder",)), log=lambda line: None)
    assert not (out / "vae_encoder.onnx").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    (entry,) = report(out)["graphs"]
    assert entry["status"] == "failed" and "relative L2" in entry["error"] and entry["max_rel_l2"] > 1e-12
    assert json.loads((out / "manifest.json").read_text())["graphs"] == {}


def test_large_graph_goes_to_one_external_data_file(onnx_fp32_dir, tiny_model_dir, tmp_path, monkeypatch):
    from sdengine.export import onnx_io

    folder = copy_export(onnx_fp32_dir, tmp_path / "external")
    monkeypatch.setattr(onnx_io, "PROTO_LIMIT", 0)  # every graph counts as "over 2 GB"
    export_model(tiny_model_dir, folder, ExportSettings(force=True, graphs=("vae_decoder",)), log=lambda line: None)
    entry = Manifest.read(folder).graphs["vae_decoder"]
    assert list(entry["external_data"]) == ["vae_decoder.onnx.data"]
    assert (folder / "vae_decoder.onnx").stat().st_size < 100_000 < (folder / "vae_decoder.onnx.data").stat().st_size
    from sdengine.files import umask_mode

    for name in ("vae_decoder.onnx", "vae_decoder.onnx.data"):  # what open() gives, not a writer's 0o600
        assert (folder / name).stat().st_mode & 0o777 == umask_mode(0o666), name
    import sdengine

    image = sdengine.load_pipeline(folder, backend="onnxruntime")("a cat", num_inference_steps=2, seed=0).images[0]
    assert image.size == (64, 64)


def test_static_export_has_fixed_dims_and_generates(tiny_model_dir, tiny_pipeline, tmp_path):
    """--static: every dim fixed; guidance 1 (B text rows into a 2B-row static graph) still matches torch."""
    import sdengine

    out = tmp_path / "static"
    export_model(tiny_model_dir, out, ExportSettings(static=True, batch=(2,), height=(72,), width=(64,)),
                 log=lambda line: None)
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in onnx.load(str(out / "vae_decoder.onnx")).graph.output]
    assert dims == [[2, 3, 72, 64]]
    ids = onnx.load(str(out / "text_encoder.onnx")).graph.input[0]
    assert [d.dim_value for d in ids.type.tensor_type.shape.dim] == [4, 77]
    pipe = sdengine.load_pipeline(out, backend="onnxruntime")
    for guidance in (7.5, 1.0):
        kwargs = dict(num_inference_steps=8, seed=2, guidance_scale=guidance, num_images_per_prompt=2,
                      height=72, width=64)
        got, ref = pixels(pipe("a cat", **kwargs)), pixels(tiny_pipeline("a cat", **kwargs))
        assert np.abs(got - ref).max() <= 2, guidance
    with pytest.raises(InvalidInputError, match="images 1 is outside this ONNX export's range 2"):
        pipe("a cat", num_inference_steps=2, height=72, width=64)


@pytest.mark.parametrize("args, match", [
    (["--batch", "0:2"], "--batch"),
    (["--batch", "3:1"], "--batch"),
    (["--batch", "1:99"], "--batch"),
    (["--height", "60:128"], "multiples of 8"),
    (["--width", "a:b"], "--width"),
    (["--opset", "11"], "--opset"),
    (["--static", "--height", "64:128"], "--static"),
])
def test_cli_export_refuses_bad_settings_before_loading(tiny_model_dir, tmp_path, args, match):
    r = run_cli("export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), *args, torch_blocked=True)
    assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_export_refuses_missing_model_and_file_out(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_cli("export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), torch_blocked=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("export", "--model", str(tmp_path), "--out", str(tmp_path / "file"), torch_blocked=True)
    assert r.returncode == 2 and "is a file" in r.stderr


def test_ranges_outside_model_limits_are_refused(tiny_components):
    with pytest.raises(InvalidInputError, match="height range"):
        ExportSettings(height=(64, 4096)).ranges(tiny_components.config)


def test_export_script_is_the_cli(tiny_model_dir, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "export" / "onnx_export.py"
    r = subprocess.run([sys.executable, str(script), "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                        "--opset", "3"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(script.parent.parent)})
    assert r.returncode == 2 and "--opset must be between 17 and 20" in r.stderr


def test_quick_validation_points_are_small_and_move_every_dynamic_axis():
    """SD 1.5's default ranges (1-4 images, 256-1024 px): the trace point is the smallest shape, and the second
    point differs from it in every dynamic axis while staying at the bottom of the range (no 512 or 1024 px run)."""
    config = ModelConfig.sd15()
    ranges = ShapeRanges.default(config)
    first, other = validation_points(config, ranges)
    assert first == trace_point(config, ranges)
    assert (first["batch"], first["height"], first["width"], first["rows"], first["context"]) == (1, 256, 256, 2, 77)
    assert (other["batch"], other["height"], other["width"], other["rows"], other["context"]) == (2, 264, 280, 3, 154)
    for dim in ("batch", "rows", "latent_height", "latent_width", "context"):
        assert other[dim] != first[dim], dim
    assert other["latent_height"] % 2 and other["latent_width"] % 2  # odd latent sides: the U-Net's padded path


def test_full_validation_adds_the_opt_and_largest_shapes():
    config = ModelConfig.sd15()
    ranges = ShapeRanges.default(config)
    quick, full = validation_points(config, ranges), validation_points(config, ranges, "full")
    assert full[:2] == quick and len(full) == 4
    assert (full[2]["batch"], full[2]["height"], full[2]["width"]) == (1, 512, 512)
    assert (full[3]["batch"], full[3]["height"], full[3]["width"], full[3]["rows"], full[3]["context"]) == \
        (4, 1024, 1024, 8, 77 * 8)
    static = ShapeRanges.default(config, static=True)
    assert validation_points(config, static, "full") == validation_points(config, static)  # one shape: no more
    assert validation_points(config, static)[0] == validation_points(config, static)[1]
    with pytest.raises(InvalidInputError, match="quick, full"):
        validation_points(config, ranges, "all")


def test_validate_setting_and_flag():
    from sdengine.cli import build_parser

    assert ExportSettings().validate == "quick"
    with pytest.raises(InvalidInputError, match="--validate takes quick or full"):
        ExportSettings(validate="all")
    parser = build_parser()
    assert parser.parse_args(["export", "--out", "x"]).validate == "quick"
    assert parser.parse_args(["export", "--out", "x", "--validate", "full"]).validate == "full"
    with pytest.raises(SystemExit):
        parser.parse_args(["export", "--out", "x", "--validate", "all"])


def test_full_validation_runs_every_point(tiny_model_dir, tmp_path):
    out = tmp_path / "full"
    (result,) = export_model(tiny_model_dir, out, ExportSettings(graphs=("vae_decoder",), validate="full"),
                             log=lambda line: None)
    ranges = ShapeRanges.default(ModelConfig.tiny())
    wanted = [{"batch": p["batch"], "latent_height": p["latent_height"], "latent_width": p["latent_width"]}
              for p in validation_points(ModelConfig.tiny(), ranges, "full")]
    assert result.status == "passed" and report(out)["graphs"][0]["validation"] == "full"
    assert [p["dims"] for p in report(out)["graphs"][0]["points"]] == wanted and len(wanted) >= 3
    assert wanted[-1] == {"batch": 4, "latent_height": 16, "latent_width": 16}  # the largest shape


@pytest.mark.parametrize("name", ["vae_decoder", "denoise_step"])
def test_fp16_conversion_without_copies_gives_the_converters_graph(tiny_components, tmp_path, name):
    """The fp16 graph built from a protobuf without the large tensors' data (Traced) is the graph ONNX Runtime's
    converter makes from the whole protobuf, as before: the same nodes, and every initializer bit for bit."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from sdengine.export import fp16, onnx_io
    from sdengine.export.wrappers import build

    gm = build(name, tiny_components)
    ranges = ShapeRanges.default(tiny_components.config)
    traced = onnx_io.trace(gm, trace_point(tiny_components.config, ranges), 17, False)
    assert traced.arrays and not any(t.raw_data for t in traced.model.graph.initializer if t.name in traced.arrays)
    onnx_io.save(onnx_io.Traced(onnx.ModelProto.FromString(traced.model.SerializeToString()), dict(traced.arrays)),
                 tmp_path / "fp32.onnx")
    whole = onnx.load(str(tmp_path / "fp32.onnx"))  # the old path: every tensor inside the protobuf
    fp16.fold_constant_nodes(whole)
    keep = fp16.fp32_nodes(whole, gm.spec, gm.body, gm.fp32_attention)
    whole = convert_float_to_float16(fp16._with_value_info(whole), keep_io_types=True,
                                     op_block_list=list(fp16.FP32_OPS), node_block_list=keep, disable_shape_infer=True)
    fp16.toposort(whole.graph)
    fp16.collapse_casts(whole)

    new = fp16.to_fp16(traced, gm.spec, gm.body, gm.fp32_attention)
    assert [n.SerializeToString() for n in new.model.graph.node] == [n.SerializeToString() for n in whole.graph.node]
    assert len(new.model.graph.initializer) == len(whole.graph.initializer)
    halves = 0
    for got, want in zip(new.model.graph.initializer, whole.graph.initializer):
        assert (got.name, got.data_type, list(got.dims)) == (want.name, want.data_type, list(want.dims))
        value, ref = new.value(got), onnx.numpy_helper.to_array(want)
        assert value.dtype == ref.dtype and value.tobytes() == ref.tobytes(), got.name
        halves += got.name in new.arrays and value.dtype == np.float16
    assert halves > 0 and set(new.arrays) <= {t.name for t in new.model.graph.initializer}


def test_detach_reads_external_and_inline_tensors_and_save_streams_them(tmp_path):
    """`detach` holds every external initializer (the exporter writes graphs over 2 GB so) and every inline one over
    4 KiB as a numpy array, and `save` writes them back, inline or streamed: the values survive both ways."""
    from onnx import helper, numpy_helper

    from sdengine.export import onnx_io

    rng = np.random.default_rng(0)
    values = {"big": rng.standard_normal((64, 48)).astype(np.float32), "half": rng.standard_normal(3000).astype(
        np.float16), "small": np.arange(6, dtype=np.float32).reshape(2, 3)}
    inits = [numpy_helper.from_array(v, k) for k, v in values.items()]
    nodes = [helper.make_node("Identity", [k], [f"{k}_out"]) for k in values]
    outs = [helper.make_tensor_value_info(f"{k}_out", helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in values.items()]
    for external in (True, False):
        model = helper.make_model(helper.make_graph(nodes, "g", [], outs, inits))  # onnx.save_model changes it
        src = tmp_path / f"src-{external}" / "g.onnx"
        src.parent.mkdir()
        onnx.save_model(model, str(src), save_as_external_data=external, all_tensors_to_one_file=False,
                        size_threshold=0)
        traced = onnx_io.detach(src)
        held = ["big", "half", "small"] if external else ["big", "half"]  # external, or inline over 4 KiB
        assert sorted(traced.arrays) == held
        assert not any(t.raw_data or t.external_data for t in traced.model.graph.initializer if t.name in traced.arrays)
        for t in traced.model.graph.initializer:
            assert np.array_equal(traced.value(t), values[t.name]) and traced.value(t).dtype == values[t.name].dtype
        for limit in (0, onnx_io.PROTO_LIMIT):
            again = onnx_io.detach(src)
            dst = tmp_path / f"dst-{external}-{limit}"
            dst.mkdir()
            with mock.patch.object(onnx_io, "PROTO_LIMIT", limit):
                location = onnx_io.save(again, dst / "g.onnx")
            assert again.arrays == {} and location == (None if limit else "g.onnx.data")
            saved = onnx.load(str(dst / "g.onnx"))  # reads the external data back
            assert {t.name: numpy_helper.to_array(t).tolist() for t in saved.graph.initializer} == \
                {k: v.tolist() for k, v in values.items()}
            if location:
                offsets = [int({e.key: e.value for e in t.external_data}["offset"])
                           for t in onnx.load(str(dst / "g.onnx"), load_external_data=False).graph.initializer
                           if t.external_data]
                assert len(offsets) == len(held) and all(o % onnx_io.ALIGN == 0 for o in offsets)


def test_each_network_is_freed_before_its_last_graphs_session(tiny_model_dir, tmp_path, monkeypatch):
    """The export's peak memory (issue 18): the torch reference outputs are computed first, and a network no later
    graph needs is freed before ONNX Runtime opens the session of its last graph, so the two are never held at once."""
    import weakref
    from pathlib import Path

    import onnxruntime

    from sdengine.export import run

    alive: dict[str, weakref.ref] = {}
    seen: dict[str, dict[str, bool]] = {}
    real_load, real_session = run.load_components, onnxruntime.InferenceSession

    def load(*args, **kwargs):
        components = real_load(*args, **kwargs)
        alive.update({part: weakref.ref(getattr(components, part)) for part in ("text_encoder", "unet", "vae")})
        return components  # no reference kept here: only the weak ones

    def session(path, *args, **kwargs):
        seen[Path(path).name] = {part: ref() is not None for part, ref in alive.items()}  # no gc.collect(): as it runs
        return real_session(path, *args, **kwargs)

    monkeypatch.setattr(run, "load_components", load)
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    graphs = ("text_encoder", "denoise_step", "unet", "vae_decoder", "vae_encoder")
    results = export_model(tiny_model_dir, tmp_path / "out", ExportSettings(graphs=graphs), log=lambda line: None)
    assert [(r.graph, r.status) for r in results] == [(g, "passed") for g in graphs]
    assert seen == {
        "text_encoder.onnx": {"text_encoder": False, "unet": True, "vae": True},
        "denoise_step.onnx": {"text_encoder": False, "unet": True, "vae": True},  # the plain U-Net graph follows
        "unet.onnx": {"text_encoder": False, "unet": False, "vae": True},
        "vae_decoder.onnx": {"text_encoder": False, "unet": False, "vae": True},
        "vae_encoder.onnx": {"text_encoder": False, "unet": False, "vae": False},
    }
