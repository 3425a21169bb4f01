"""Engine-set manifests without TensorRT: round trip, host checks, plan checks, profiles and build ranges."""

from __future__ import annotations

import json
import shlex

import pytest
from engine_support import GPU, TRT_VERSION, make_engine_set

from sdengine import engine_manifest as em
from sdengine.cli import build_parser
from sdengine.config import ModelConfig
from sdengine.engine_build import BuildSettings, build_ranges
from sdengine.errors import EngineMismatchError, InvalidInputError, ModelLoadError, UnsupportedModelError
from sdengine.files import write_json_atomic
from sdengine.specs import GRAPHS, Range, ShapeRanges, profile

PLANS = {"text_encoder": b"te" * 50, "denoise_step": b"ds" * 80, "vae_decoder": b"vd" * 60, "vae_encoder": b"ve" * 40}
TINY = ModelConfig.tiny()


@pytest.fixture
def engine_set(tmp_path):
    return make_engine_set(tmp_path / "engines" / "tiny", PLANS)


def test_round_trip_records_everything(engine_set):
    back = em.read(engine_set.folder)
    assert back == engine_set
    data = json.loads((engine_set.folder / "manifest.json").read_text())
    assert (data["format"], data["format_version"]) == ("sdengine-engines", 3)
    assert data["tensorrt_version"] == TRT_VERSION and data["gpu"] == {"name": GPU[0], "compute_capability": GPU[1]}
    assert data["precision"] == "fp16" and data["static"] is False and data["sdengine_version"]
    assert data["builder"] == {"workspace_gb": None, "opt_level": 3, "refittable": False, "timing_cache": None}
    assert data["source"] == {"onnx_folder": "/data/onnx/tiny-fp16", "sha256": "ab" * 32}
    assert data["model_config"] == json.loads(json.dumps(TINY.to_dict()))
    for name, plan in PLANS.items():
        entry = data["graphs"][name]
        assert entry["file"] == f"{name}.plan" and entry["size"] == len(plan) and len(entry["onnx_sha256"]) == 64
        assert entry["profile"] == {k: [list(s) for s in v] for k, v in
                                    profile(GRAPHS[name], TINY, ShapeRanges.default(TINY)).items()}


def test_layout_and_verified_plans(engine_set):
    assert sorted(p.name for p in engine_set.folder.iterdir()) == [
        "denoise_step.plan", "manifest.json", "text_encoder.plan", "tokenizer", "vae_decoder.plan", "vae_encoder.plan"]
    paths = em.verify_plans(engine_set)
    assert paths == {name: engine_set.folder / f"{name}.plan" for name in em.ENGINE_GRAPHS}


def test_profiles_follow_the_specs_for_dynamic_and_static_ranges():
    dynamic = em.profiles(TINY, ShapeRanges.default(TINY), em.ENGINE_GRAPHS)
    assert dynamic["text_encoder"]["input_ids"] == [[1, 77], [2, 77], [8, 77]]  # rows: B..2B, opt guided
    assert dynamic["denoise_step"]["state"] == [[4, 1, 4, 8, 8], [4, 1, 4, 8, 8], [4, 4, 4, 16, 16]]  # 4 slots
    # 77 x 1..8 prompt chunks (a dynamic axis)
    assert dynamic["denoise_step"]["text_embeddings"] == [[2, 77, 32], [2, 77, 32], [8, 77 * 8, 32]]
    assert dynamic["denoise_step"]["coefficients"] == [[24], [24], [24]]  # A (4x4), b (4), c (4)
    assert dynamic["denoise_step"]["noise"] == [[1, 4, 8, 8], [1, 4, 8, 8], [4, 4, 16, 16]]
    assert dynamic["vae_decoder"]["latent"] == [[1, 4, 8, 8], [1, 4, 8, 8], [4, 4, 16, 16]]
    static = em.profiles(TINY, ShapeRanges(Range(2, 2, 2), Range(96, 96, 96), Range(64, 64, 64), True),
                         em.ENGINE_GRAPHS)
    for graph in ("denoise_step", "vae_decoder"):
        for lo, opt, hi in static[graph].values():
            assert lo == opt == hi
    assert static["denoise_step"]["state"][0] == [4, 2, 4, 12, 8]
    one = em.profiles(TINY, ShapeRanges(Range(1, 1, 1), Range(64, 64, 64), Range(64, 64, 64), True, slots=1),
                      em.ENGINE_GRAPHS)
    assert one["denoise_step"]["state"][0] == [1, 1, 4, 8, 8] and one["denoise_step"]["coefficients"][0] == [3]
    assert static["text_encoder"]["input_ids"] == [[2, 77], [4, 77], [4, 77]]  # B rows unguided, 2B guided
    assert static["denoise_step"]["text_embeddings"][0] == [4, 77, 32]  # a static set reads one prompt chunk


@pytest.mark.parametrize("host, says", [
    (("10.9.0.34", *GPU), f"built with TensorRT {TRT_VERSION}, this host has 10.9.0.34"),
    ((TRT_VERSION, "NVIDIA L4", GPU[1]), f"built on a {GPU[0]}, this host has a NVIDIA L4"),
    ((TRT_VERSION, GPU[0], "8.9"), "built for compute capability 9.0, this GPU has 8.9"),
])
def test_each_host_difference_is_named_with_the_rebuild_command(engine_set, host, says):
    em.check(engine_set, TRT_VERSION, *GPU)  # the build host passes
    with pytest.raises(EngineMismatchError) as err:
        em.check(engine_set, *host)
    message = str(err.value)
    assert says in message
    assert (f"rebuild with sdengine build --onnx /data/onnx/tiny-fp16 --out {engine_set.folder} "
            f"--batch 1:1:4 --height 64:64:128 --width 64:64:128 --opt-level 3") in message


def test_all_differences_at_once(engine_set):
    with pytest.raises(EngineMismatchError, match="TensorRT 10.8.0.43, this host has 11.4.0.106; built on a .*"
                                                  "this host has a NVIDIA B200; .*compute capability 9.0, this GPU "
                                                  "has 10.0"):
        em.check(engine_set, "11.4.0.106", "NVIDIA B200", "10.0")


def test_rebuild_command_reproduces_static_and_builder_options(tmp_path):
    ranges = ShapeRanges(Range(2, 2, 2), Range(96, 96, 96), Range(64, 64, 64), static=True)
    builder = em.BuilderSettings(workspace_gb=2.5, opt_level=5, refittable=True, timing_cache="/c/my cache.bin")
    m = make_engine_set(tmp_path / "e s", PLANS, ranges=ranges, builder=builder)
    cmd = m.rebuild_command()
    assert cmd == (f"sdengine build --onnx /data/onnx/tiny-fp16 --out '{tmp_path}/e s' --static --batch 2 "
                   f"--height 96 --width 64 --workspace-gb 2.5 --opt-level 5 --timing-cache '/c/my cache.bin' "
                   f"--refittable")
    args = build_parser().parse_args(shlex.split(cmd)[1:])  # the command parses as `sdengine build` arguments
    assert (args.static, args.batch, args.height, args.width, args.workspace_gb, args.opt_level, args.refittable,
            args.timing_cache) == (True, "2", "96", "64", 2.5, 5, True, "/c/my cache.bin")


def test_missing_truncated_and_changed_plans(engine_set):
    folder = engine_set.folder
    cmd = "rebuild with sdengine build --onnx /data/onnx/tiny-fp16"
    plan = folder / "denoise_step.plan"
    plan.write_bytes(PLANS["denoise_step"][:-7])
    with pytest.raises(ModelLoadError, match=f"has 153 bytes, 160 were built: it is truncated or corrupt; {cmd}"):
        em.verify_plans(engine_set)
    plan.write_bytes(b"x" * len(PLANS["denoise_step"]))
    with pytest.raises(ModelLoadError, match=f"sha256 mismatch.*{cmd}"):
        em.verify_plans(engine_set)
    plan.unlink()
    with pytest.raises(ModelLoadError, match=f"denoise_step.plan is missing from the engine set; {cmd}"):
        em.verify_plans(engine_set)
    assert em.verify_plans(engine_set, ("text_encoder",)) == {"text_encoder": folder / "text_encoder.plan"}


def test_engine_missing_from_the_manifest_and_tokenizer(tmp_path):
    m = make_engine_set(tmp_path / "e", {"text_encoder": PLANS["text_encoder"]})
    with pytest.raises(ModelLoadError, match="has no denoise_step engine; rebuild with sdengine build"):
        em.verify_plans(m)
    (m.folder / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer is missing or incomplete; rebuild"):
        em.verify_plans(m, ("text_encoder",))


def test_unreadable_manifests(tmp_path, engine_set):
    path = engine_set.folder / "manifest.json"
    with pytest.raises(ModelLoadError, match="does not exist: build one with sdengine build --onnx ONNX_DIR"):
        em.read(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no manifest.json.*build it with sdengine build"):
        em.read(tmp_path / "empty")
    data = json.loads(path.read_text())
    path.write_text(path.read_text()[:-20])
    with pytest.raises(ModelLoadError, match="not valid JSON.*rebuild the set with sdengine build"):
        em.read(engine_set.folder)
    write_json_atomic(path, {**data, "format": "sdengine-onnx"})
    with pytest.raises(ModelLoadError, match="not an sdengine engine-set manifest"):
        em.read(engine_set.folder)
    write_json_atomic(path, {**data, "format_version": 99})
    with pytest.raises(UnsupportedModelError, match="format version 99"):
        em.read(engine_set.folder)
    del data["gpu"]
    write_json_atomic(path, data)
    with pytest.raises(ModelLoadError, match="incomplete.*'gpu'.*sdengine build --onnx /data/onnx/tiny-fp16"):
        em.read(engine_set.folder)


def test_check_source_notices_a_re_export(tmp_path):
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    graphs = {name: {"file": f"{name}.onnx", "sha256": "0" * 64} for name in PLANS}
    data = {"format": "sdengine-onnx", "format_version": 3, "model_config": TINY.to_dict(), "precision": "fp16",
            "shapes": ShapeRanges.default(TINY).to_dict(), "source": {"sha256": "ab" * 32}, "graphs": graphs}
    write_json_atomic(onnx / "manifest.json", data)
    m = make_engine_set(tmp_path / "e", PLANS, source=str(onnx))
    with pytest.raises(EngineMismatchError, match="text_encoder engine .* was built from an ONNX graph that .* no "
                                                  "longer holds .*re-exported.*rebuild with sdengine build"):
        em.check_source(m)
    for name in PLANS:
        graphs[name]["sha256"] = m.graphs[name].onnx_sha256
    write_json_atomic(onnx / "manifest.json", data)
    em.check_source(m)  # unchanged export: fine
    em.check_source(make_engine_set(tmp_path / "e2", PLANS, source=str(tmp_path / "gone")))  # removed: fine


def test_request_outside_the_built_ranges(engine_set):
    em.check_shape(engine_set, 4, 128, 64)
    with pytest.raises(InvalidInputError, match=r"height 256 is outside the range 64\.\.128 .*sdengine build "
                                                r"--height MIN:OPT:MAX"):
        em.check_shape(engine_set, 1, 256, 64)
    with pytest.raises(InvalidInputError, match=r"images 5 .*1\.\.4.*sdengine build --batch"):
        em.check_shape(engine_set, 5, 64, 64)


def test_builder_settings_are_checked():
    with pytest.raises(InvalidInputError, match="--opt-level must be between 0 and 5"):
        em.BuilderSettings(opt_level=6)
    with pytest.raises(InvalidInputError, match="--workspace-gb must be a number > 0"):
        em.BuilderSettings(workspace_gb=0)


# --- build ranges: the export's, or narrower ones inside them --------------------------------------

EXPORT = ShapeRanges.default(TINY)  # batch 1:1:4, sides 64:64:128


def test_build_ranges_default_to_the_export():
    assert build_ranges(EXPORT, 8, BuildSettings()) == EXPORT


def test_build_ranges_narrow_within_the_export():
    r = build_ranges(EXPORT, 8, BuildSettings(batch=(1, 2), height=(64, 96, 128), width=(96,)))
    assert (r.batch, r.height, r.width, r.static) == (Range(1, 1, 2), Range(64, 96, 128), Range(96, 96, 96), False)
    s = build_ranges(EXPORT, 8, BuildSettings(static=True, batch=(2,)))
    assert (s.batch, s.height, s.width, s.static) == (Range(2, 2, 2), Range(64, 64, 64), Range(64, 64, 64), True)


@pytest.mark.parametrize("settings, match", [
    (BuildSettings(height=(64, 256)), r"--height 64\.\.256 lies outside the ONNX export's range 64\.\.128"),
    (BuildSettings(batch=(1, 8)), r"--batch 1\.\.8 lies outside .* 1\.\.4.*sdengine export --batch"),
    (BuildSettings(static=True, width=(256,)), r"--width 256 lies outside"),
    (BuildSettings(width=(64, 100)), "multiples of 8"),
])
def test_build_ranges_outside_the_export_are_refused(settings, match):
    with pytest.raises(InvalidInputError, match=match):
        build_ranges(EXPORT, 8, settings)


def test_a_static_export_builds_static_engines():
    static = ShapeRanges(Range(1, 1, 1), Range(64, 64, 64), Range(64, 64, 64), static=True)
    assert build_ranges(static, 8, BuildSettings()) == static
    with pytest.raises(InvalidInputError, match="the ONNX export is static .* one value"):
        build_ranges(static, 8, BuildSettings(batch=(1, 2)))
    with pytest.raises(InvalidInputError, match="--static takes one value"):
        BuildSettings(static=True, height=(64, 128))
