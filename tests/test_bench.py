"""`sdengine bench`: the JSON document, the tables, the timers and memory probes, and option errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from torch_block import BLOCK_TORCH

from sdengine.bench.cli import command_line, settings_from_args
from sdengine.bench.memory import HostPeak
from sdengine.bench.settings import BenchSettings, Subject, parse_subjects, parse_value
from sdengine.bench.stages import backend_wait
from sdengine.bench.timing import measure, percentile, timed
from sdengine.cli import build_parser, main

pytest.importorskip("onnxruntime")
STEPS, RUNS, WARMUP, BATCHES = 3, 3, 1, (1, 2)
SMALL = ["--steps", str(STEPS), "--runs", str(RUNS), "--warmup", str(WARMUP), "--batches", *map(str, BATCHES),
         "--throughput-runs", "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def bench(tiny_model_dir, tmp_path_factory):
    """One run on the tiny model: torch, onnxruntime (exported by the bench) and diffusers eager."""
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    argv = ["bench", "--model", str(tiny_model_dir), "--backend", "torch", "onnxruntime", "--compare", "diffusers",
            "--onnx-dir", str(out / "onnx"), "--json", str(path), *SMALL]
    proc = subprocess.run([sys.executable, "-m", "sdengine", *argv], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(path.read_text()), proc.stdout, out


def test_document_describes_the_run(bench, tiny_model_dir):
    doc, _, _ = bench
    assert doc["schema"] == "sdengine-bench/1"
    assert doc["command"].startswith("sdengine bench --model ") and "--compare diffusers" in doc["command"]
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["cpu"] and doc["machine"]["gpu"] is None
    for package in ("sdengine", "torch", "onnxruntime", "diffusers", "numpy"):
        assert doc["versions"][package], package
    assert doc["settings"]["steps"] == STEPS and doc["settings"]["batches"] == list(BATCHES)
    assert doc["model"]["path"] == str(tiny_model_dir)
    assert [r["label"] for r in doc["subjects"]] == ["torch", "onnxruntime", "diffusers"]


def test_every_subject_has_sane_figures(bench):
    doc, _, _ = bench
    for r in doc["subjects"]:
        assert "error" not in r, r
        assert r["load_s"] > 0 and r["warmup_excess_s"] >= 0
        assert r["shape"] == {**r["shape"], "width": 64, "height": 64, "text_rows": 2}
        for name, series in r["series"].items():
            assert series["runs"] == RUNS == len(series["samples_s"]) and len(series["warmup_s"]) == WARMUP, name
            assert series["max_s"] >= series["p95_s"] >= series["p50_s"] >= series["min_s"] > 0, name
        assert set(r["stages_p50_s"]) == {"tokenizer", "text_encoder", "denoise_step", "vae_decode", "vae_encode"}
        assert r["stages_p50_s"]["denoise_step"] == pytest.approx(r["series"]["denoise_loop"]["p50_s"] / STEPS)
        assert [t["batch"] for t in r["throughput"]] == list(BATCHES)
        for t in r["throughput"]:
            assert t["images_per_s"] == pytest.approx(t["batch"] / t["seconds_per_call"]["p50_s"])
        assert r["throughput"][0]["source"] == "e2e" and r["throughput"][1]["seconds_per_call"]["runs"] == 2
        assert r["memory"]["after_load"]["host_peak_mib"] > 50 and r["memory"]["runs"]["host_peak_mib"] > 50
        assert "VmHWM" in r["memory"]["host_method"] or "VmRSS" in r["memory"]["host_method"]


def test_end_to_end_and_the_stages_are_all_reported(bench):
    """Every subject has e2e and each stage as its own series, each defined in the document (no timing is
    asserted: on a shared machine wall-clock ratios are not facts; figures belong in benchmarks/)."""
    doc, _, _ = bench
    for r in doc["subjects"]:
        assert set(r["series"]) == {"e2e", "tokenizer", "text_encoder", "denoise_loop", "vae_decode", "vae_encode"}, \
            r["label"]
        assert r["throughput"][0]["seconds_per_call"] == r["series"]["e2e"]  # batch 1 is the e2e series
    assert {"e2e", "tokenizer", "text_encoder", "denoise_step", "vae_decode", "vae_encode"} <= set(doc["definitions"])


def test_each_subject_ran_where_it_should(bench):
    doc, _, _ = bench
    torch_r, ort_r, diff_r = doc["subjects"]
    assert ort_r["runtime"]["torch_imported"] is False and ort_r["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert torch_r["runtime"]["torch_imported"] and torch_r["runtime"]["torch_threads"] == 1
    assert ort_r["prepared"]["export_s"] > 0
    assert ort_r["prepared"]["graphs_written"] == 4  # the plain U-Net only with --unet-graph
    assert ort_r["prepared"]["shapes"]["batch"][-1] == max(BATCHES)
    assert diff_r["kind"] == "diffusers" and diff_r["shape"]["recipe"] == "eager"
    assert diff_r["shape"]["scheduler"] == "DDIMScheduler" and diff_r["shape"]["dtype"] == "float32"
    assert len({r["runtime"]["pid"] for r in doc["subjects"]}) == 3


def test_tables_on_stdout(bench):
    _, stdout, _ = bench
    for title in ("e2e p50 s", "denoise step ms", "images/s at 2", "host peak MiB (runs)", "speed-up vs diffusers"):
        assert title in stdout
    assert stdout.count("| onnxruntime |") == 4 and "wrote " in stdout


def test_export_folder_as_model(bench, tmp_path):
    """--model an export folder: onnxruntime loads it as is, torch the source its manifest names."""
    _, _, out = bench
    path = tmp_path / "b.json"
    code = main(["bench", "--model", str(out / "onnx"), "--backend", "onnxruntime", "torch", "--only",
                 "denoise_step", "--runs", "2", "--warmup", "0", "--steps", "2", "--threads", "1", "--quiet",
                 "--json", str(path)])
    doc = json.loads(path.read_text())
    assert code == 0, doc
    ort_r, torch_r = doc["subjects"]
    assert ort_r["prepared"]["what"].startswith("none") and torch_r["model_path"] == doc["model"]["path"]
    assert set(ort_r["series"]) == {"denoise_loop"} and "throughput" not in ort_r


def run_cli(*args: str) -> subprocess.CompletedProcess:
    from cli_support import invoke

    return invoke("bench", *args)


@pytest.mark.parametrize("args, message", [
    (["--runs", "1"], "--runs must be >= 2"),
    (["--batches", "0"], "--batches takes distinct sizes"),
    (["--batches", "2", "2"], "--batches takes distinct sizes"),
    (["--backend", "nope"], "unknown backend 'nope'"),
    (["--option", "compile"], "--option takes [LABEL:]KEY=VALUE"),
    (["--option", "other:compile=1"], "no --backend labelled 'other'"),
    (["--compare", "diffusers-compiled"], "runs on a CUDA GPU only"),
    (["--size", "65"], "must be a multiple of 8"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--json", "/nonexistent/dir/out.json"], "does not exist"),
    (["--random-model", "tiny", "--model", "x"], "not both"),
])
def test_bad_options_one_line_exit_2(args, message):
    r = run_cli(*args, "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sdengine: error: ") and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_unknown_backend_option_is_reported(tiny_model_dir):
    """A load option the backend does not take fails in its worker: one line naming it, exit 2."""
    r = run_cli("--model", str(tiny_model_dir), "--option", "no_such_option=1", "--steps", "1", "--runs", "2",
                "--only", "tokenizer", "--quiet")
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("sdengine: error:")]
    assert len(errors) == 1 and "no_such_option" in errors[0] and "torch" in errors[0], r.stderr


def test_worker_keeps_what_it_measured_when_a_part_fails(monkeypatch, tmp_path):
    """A failure late in a run (here: batch 2) leaves the earlier figures in the result, and the tables."""
    from sdengine.bench import report, worker
    from sdengine.bench.stages import Stages, wait_for_value
    from sdengine.errors import InvalidInputError

    class Fake(Stages):
        wait = staticmethod(wait_for_value)

        def e2e(self, batch):
            if batch == 2:
                raise InvalidInputError("batch 2 does not fit")
            time.sleep(0.002)

        tokenize = encode = denoise = decode = encode_image = lambda self: time.sleep(0.001)

        def info(self):
            return {"width": 64, "height": 64, "text_rows": 2}

    monkeypatch.setattr(worker, "load_subject", lambda *args: Fake())
    settings = BenchSettings((Subject("torch", "backend", "torch"),), runs=2, warmup=1, batches=(1, 2))
    job, out = tmp_path / "job.json", tmp_path / "result.json"
    job.write_text(json.dumps({"subject": settings.subjects[0].to_dict(), "settings": settings.to_dict(),
                               "model": "unused"}))
    assert worker.main([str(job), str(out)]) == 2
    result = json.loads(out.read_text())
    assert result["error"] == "batch 2 does not fit" and result["error_type"] == "InvalidInputError"
    assert set(result["series"]) == {"e2e", "tokenizer", "text_encoder", "denoise_loop", "vae_decode", "vae_encode"}
    assert [t["batch"] for t in result["throughput"]] == [1] and result["load_s"] >= 0
    doc = {**report.document(settings, ["sdengine", "bench"]), "subjects": [result]}
    text = report.tables(doc)
    assert "| torch | 64x64 |" in text and "failed: torch: batch 2 does not fit" in text


def test_command_line_repeats_the_settings():
    args = build_parser().parse_args(["bench", "--backend", "torch", "fast=torch", "--option", "fast:compile=true",
                                      "--option", "mode=\"max-autotune\"", "--compare", "diffusers", "--steps", "7",
                                      "--size", "128", "--batches", "1", "4", "--only", "e2e", "throughput"])
    settings = settings_from_args(args)
    again = settings_from_args(build_parser().parse_args(command_line(settings, None)[1:]))
    assert again == settings
    assert dict(settings.subjects[1].options) == {"compile": True, "mode": "max-autotune"}
    assert settings.subjects[1].backend == "torch" and settings.subjects[2].kind == "diffusers"


def test_option_values():
    assert [parse_value(v) for v in ("true", "False", "3", "0.5", "null", "max-autotune", "[1, 2]")] == \
        [True, False, 3, 0.5, None, "max-autotune", [1, 2]]
    (s,) = parse_subjects(["b=onnxruntime"], [], ["threads=1", "b:providers=[\"CPUExecutionProvider\"]"], [],
                          ("torch", "onnxruntime"))
    assert s == Subject("b", "backend", "onnxruntime", (("providers", ["CPUExecutionProvider"]), ("threads", 1)))


def test_compile_mode_defaults_to_cuda_graphs_on_a_gpu():
    subject = (Subject("diffusers-compiled", "diffusers", compiled=True),)
    assert BenchSettings(subject, device="cuda").check().effective_compile_mode == "reduce-overhead"
    assert BenchSettings(subject, device="cuda", compile_mode="max-autotune").effective_compile_mode == "max-autotune"


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 11):
        xs = rng.random(n).tolist()
        for q in (0, 50, 95, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_timer_includes_the_completion_wait():
    """The wait (a device sync) runs inside the timer, once per call, after the call returns."""
    events = []
    elapsed = timed(lambda: events.append("call") or "result", lambda v: (events.append(v), time.sleep(0.05)))
    assert elapsed >= 0.05 and events == ["call", "result"]
    summary = measure(lambda: events.append("call"), runs=3, warmup=2, wait=lambda v: None)
    assert summary.runs == 3 and len(summary.warmup_s) == 2 and events.count("call") == 6


def test_backend_synchronize_is_the_wait():
    calls = []

    class Backend:
        def synchronize(self):
            calls.append("sync")

    class Device:
        def synchronize(self):
            calls.append("device sync")

    class RuntimeBackend:
        device = Device()

    backend_wait(Backend())(object())
    backend_wait(RuntimeBackend())(object())
    assert calls == ["sync", "device sync"]
    backend_wait(object())(np.zeros(3))  # host results: nothing to wait for


def test_host_peak_resets_and_rises():
    peak = HostPeak()
    if peak.method.startswith("unavailable"):
        pytest.skip("no /proc/self/status here")
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
    before = peak.peak_mib()
    del block
    peak.reset()
    after_reset = peak.peak_mib()
    block = np.ones(96 << 20, np.uint8)
    risen = peak.peak_mib()
    del block
    peak.stop()
    assert after_reset < before - 32  # the 64 MiB peak was forgotten
    assert risen > after_reset + 80  # the 96 MiB block was seen


def test_gpu_probe_without_a_gpu_reports_instead_of_failing():
    """Here cuda-python finds no driver: the GPU probe says so in the report, and nothing raises."""
    from sdengine.bench.memory import GpuPeak, device_name

    peak = GpuPeak("cuda")
    report = peak.report()
    peak.close()
    if "device_used_peak_mib" in report:
        pytest.skip("a GPU is visible: the probe worked (see the GPU test)")
    assert "device_used_error" in report and "GPU" in report["device_used_error"]
    assert device_name("cuda").startswith("unknown (") and device_name("cpu") is None


def test_gpu_probe_samples_device_memory(monkeypatch):
    """The cudaMemGetInfo sampler keeps the largest total-free it saw since reset (fake driver figures)."""
    import sdengine.runtime.cuda as cuda
    from sdengine.bench.memory import MIB, GpuPeak

    free = [8 << 30]
    monkeypatch.setattr(cuda, "memory_info", lambda: (free[0], 16 << 30))
    peak = GpuPeak("cuda")
    free[0] = 4 << 30  # 12 GiB in use
    time.sleep(0.1)
    free[0] = 10 << 30
    time.sleep(0.05)
    assert peak.report()["device_used_peak_mib"] == 12 * 1024
    peak.reset()
    assert peak.report()["device_used_peak_mib"] == (6 << 30) / MIB
    peak.close()


def test_bench_modules_import_without_torch():
    code = BLOCK_TORCH + """
import sdengine.bench.cli, sdengine.bench.runner, sdengine.bench.worker, sdengine.bench.report
import sdengine.bench.stages, sdengine.bench.memory, sdengine.bench.timing, sdengine.bench.diffusers_stages
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU (torch.cuda); run on the GPU machine")
def test_gpu_memory_and_compiled_diffusers(tiny_model_dir, tmp_path):
    """On a GPU: torch and compiled diffusers report GPU peaks, the device name and a compile excess."""
    path = tmp_path / "gpu.json"
    r = run_cli("--model", str(tiny_model_dir), "--device", "cuda", "--compare", "diffusers-compiled",
                "--steps", "3", "--runs", "3", "--batches", "1", "--json", str(path), "--quiet")
    assert r.returncode == 0, r.stderr
    doc = json.loads(path.read_text())
    assert doc["machine"]["gpu"]
    for s in doc["subjects"]:
        assert s["memory"]["runs"]["torch_max_allocated_mib"] > 0 and s["memory"]["runs"]["device_used_peak_mib"] > 0
    assert doc["subjects"][1]["warmup_excess_s"] > 0


@pytest.mark.parametrize("version, key", [("0.30.3", "torch_dtype"), ("0.35.2", "torch_dtype"), ("0.36.0", "dtype"),
                                          ("0.42.1", "dtype"), ("1.0.0.dev0", "dtype")])
def test_diffusers_gets_the_precision_argument_it_reads(version, key):
    """diffusers before 0.36 ignores dtype= (the test extra allows >= 0.30): it gets torch_dtype=."""
    from sdengine.bench.diffusers_stages import dtype_argument

    assert dtype_argument(version, "float16") == {key: "float16"}
