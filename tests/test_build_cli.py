"""`sdengine build` where there is no TensorRT and no GPU (CI): argument and input errors, the missing-TensorRT
message, and the build's orchestration (engine-set layout, manifest, timing cache, failure cleanup) over
tests/fake_tensorrt.py, a minimal stand-in that tests sdengine's logic, not TensorRT's."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import fake_tensorrt
import pytest
from onnx_support import onnx_fp16_dir, run_cli  # noqa: F401  (fixture)

from sdengine import engine_build
from sdengine.cli import main
from sdengine.engine_manifest import ENGINE_GRAPHS, read, verify_plans
from sdengine.manifest import Manifest, sha256_file
from sdengine.runtime.tensorrt import load_engine_set
from sdengine.specs import GRAPHS, profile

NO_TRT = importlib.util.find_spec("tensorrt") is None
FAKE_GPU = ("Fake GPU", "9.0")


@pytest.fixture(scope="module")
def onnx_fp32_text_encoder(tiny_model_dir, tmp_path_factory) -> Path:
    """An fp32 export of the text encoder alone (the build must refuse any fp32 export; 2 s to make)."""
    from sdengine.export import ExportSettings, export_model

    out = tmp_path_factory.mktemp("onnx") / "fp32-te"
    export_model(tiny_model_dir, out, ExportSettings(graphs=("text_encoder",)), log=lambda line: None)
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.skipif(not NO_TRT, reason="TensorRT is installed here: the missing-TensorRT message cannot show")
def test_without_tensorrt_one_line_and_exit_2(onnx_fp16_dir, tmp_path):
    r = run_cli("build", "--onnx", str(onnx_fp16_dir), "--out", str(tmp_path / "engines" / "tiny"),
                torch_blocked=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    assert "TensorRT is not installed" in r.stderr and "--backend onnxruntime" in r.stderr
    assert "pip install 'sdengine[tensorrt]'" in r.stderr
    assert not (tmp_path / "engines").exists()


def test_fp32_export_is_refused(onnx_fp32_text_encoder, tmp_path, capsys):
    assert main(["build", "--onnx", str(onnx_fp32_text_encoder), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "is an fp32 ONNX export" in err and "sdengine export --fp16" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, match", [
    (["--batch", "4:1"], "--batch takes N, MIN:MAX or MIN:OPT:MAX"),
    (["--height", "abc"], "--height takes N, MIN:MAX or MIN:OPT:MAX"),
    (["--opt-level", "9"], "--opt-level must be between 0 and 5"),
    (["--workspace-gb", "0"], "--workspace-gb must be a number > 0"),
    (["--static", "--batch", "1:4"], "--static takes one value"),
    (["--height", "64:256"], r"--height 64\.\.256 lies outside the ONNX export's range 64\.\.128"),
    (["--width", "60"], "multiples of 8"),
    (["--timing-cache", "/no/such/folder/cache.bin"], "--timing-cache .* its folder does not exist"),
])
def test_argument_errors(onnx_fp16_dir, tmp_path, capsys, args, match):
    out = tmp_path / "e"
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdengine: error: ") and err.count("\n") == 1
    assert re.search(match, err), err
    assert not out.exists()


def test_input_folder_errors(onnx_fp16_dir, tmp_path, capsys):
    assert main(["build", "--onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist: export one with sdengine export" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(tmp_path / "mine")]) == 2
    assert "is not an sdengine engine set" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["build", "--out", str(tmp_path / "e")])  # --onnx is required (argparse exits 2)


@pytest.fixture
def fake_trt(monkeypatch):
    module = fake_tensorrt.module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(engine_build, "gpu_identity", lambda: FAKE_GPU)
    return module


def test_build_writes_the_engine_set(onnx_fp16_dir, tmp_path, fake_trt, capsys):
    out, cache = tmp_path / "engines" / "tiny", tmp_path / "timing.cache"
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out), "--timing-cache", str(cache),
                 "--batch", "1:2", "--opt-level", "4", "--workspace-gb", "1.5", "--refittable"]) == 0
    stdout = capsys.readouterr().out
    assert "[2/4] denoise_step: building" in stdout and "denoise_step: Building engine done in" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["denoise_step.plan", "manifest.json", "text_encoder.plan",
                                                     "tokenizer", "vae_decoder.plan", "vae_encoder.plan"]
    assert leftovers(out.parent) == [] and cache.read_bytes() == b"cache+"
    onnx, m = Manifest.read(onnx_fp16_dir), read(out)
    assert (m.tensorrt_version, m.gpu_name, m.compute_capability) == ("10.8.0.43", *FAKE_GPU)
    assert m.source_folder == str(onnx_fp16_dir.absolute()) and m.source_sha256 == onnx.source_sha256
    assert (m.ranges.batch.max, m.builder.opt_level, m.builder.workspace_gb, m.builder.refittable,
            m.builder.timing_cache) == (2, 4, 1.5, True, str(cache))
    assert sorted((out / "tokenizer").iterdir()) and (out / "tokenizer" / "vocab.json").read_bytes() == \
        (onnx_fp16_dir / "tokenizer" / "vocab.json").read_bytes()
    for name in ENGINE_GRAPHS:
        entry = m.graphs[name]
        assert entry.onnx_sha256 == onnx.graphs[name]["sha256"] and entry.sha256 == sha256_file(out / entry.file)
        want = {k: [list(s) for s in v] for k, v in profile(GRAPHS[name], onnx.config, m.ranges).items()}
        assert entry.profile == want and entry.build_seconds >= 0
    configs = fake_tensorrt.Builder.built
    assert [c.builder_optimization_level for c in configs] == [4] * 4
    assert all(c.flags == ["refit"] and c.pools == {"workspace": int(1.5 * 2**30)} for c in configs)
    assert len({id(c.cache) for c in configs}) == 1  # one timing cache shared by the four builds
    assert configs[1].profiles[0].shapes["state"] == [[4, 1, 4, 8, 8], [4, 1, 4, 8, 8], [4, 2, 4, 16, 16]]
    assert "timestep" not in configs[1].profiles[0].shapes  # fixed-shape inputs need no profile entry
    verify_plans(m)
    manifest, engines = load_engine_set(out, gpu_name=FAKE_GPU[0], compute_capability=FAKE_GPU[1], trt=fake_trt)
    assert set(engines) == set(ENGINE_GRAPHS) and manifest == m
    engines["denoise_step"].set_input_shape("state", (4, 2, 4, 16, 8))
    for e in engines.values():
        e.close()


def test_failed_build_keeps_the_previous_set(onnx_fp16_dir, tmp_path, fake_trt, capsys):
    out = tmp_path / "tiny"
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fake_trt.Builder.fail_on = {"next_state"}  # the denoise_step build returns None
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out), "--static"]) == 2
    err = capsys.readouterr().err
    assert "could not build the denoise_step engine" in err and "rerun with --verbose" in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert leftovers(tmp_path) == []
    fake_trt.Builder.fail_on = set()
    fake_trt.OnnxParser.fail = True
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "ONNX parser rejected" in err and "unsupported operator (node n0)" in err
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_rebuild_replaces_the_set(onnx_fp16_dir, tmp_path, fake_trt):
    out = tmp_path / "tiny"
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out)]) == 0
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(out), "--static", "--height", "128"]) == 0
    m = read(out)
    assert m.static and (m.ranges.batch.max, m.ranges.height.max, m.ranges.width.max) == (1, 128, 64)
    assert json.loads((out / "manifest.json").read_text())["static"] is True and leftovers(tmp_path) == []


def test_a_profile_tensorrt_rejects_is_an_error(onnx_fp16_dir, tmp_path, fake_trt, capsys, monkeypatch):
    monkeypatch.setattr(fake_tensorrt.BuilderConfig, "add_optimization_profile", lambda self, profile: -1)
    assert main(["build", "--onnx", str(onnx_fp16_dir), "--out", str(tmp_path / "e")]) == 2
    assert "TensorRT rejected the text_encoder optimisation profile" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and leftovers(tmp_path) == []
