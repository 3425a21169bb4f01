"""benchmarks/gpu_check.py on the CPU: a clean failure without a GPU, and a dry run of its parts' logic.

The parts that need no torch on CUDA run here over tests/fake_cuda.py's host-memory runtime, with numpy
executors standing in for the PyTorch ones, so the script's own bookkeeping (buffers, captures, timers,
comparisons) is exercised before it meets the GPU. What only a GPU can show is left to the device run.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdengine.runtime import cuda
from sdengine.runtime.device import CudaDevice

real_rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
from fake_cuda import CONFIG, FakeRuntime, NumpyExecutor, text_encoder, vae_decoder  # noqa: E402

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
HAS_GPU = real_rt.cudaGetDeviceCount()[0] == real_rt.cudaError_t.cudaSuccess


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("gpu_check"), importlib.import_module("gpu_parts"), \
            importlib.import_module("gpu_models")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture
def fake(monkeypatch):
    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "_RT", rt)
    return rt


@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU")
def test_without_gpu_it_says_why_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no usable CUDA GPU" in r.stderr and "--backend onnxruntime" in r.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["error"].startswith("no usable CUDA GPU") and env["modules"]["numpy"]


def test_a_part_that_dies_or_hangs_still_leaves_its_json(bench, tmp_path):
    gpu_check = bench[0]
    write = "import json, pathlib; pathlib.Path(r'{}').write_text(json.dumps({{'ok': True, 'summary': 'fine'}}))"
    good = gpu_check.run_child(tmp_path, "tiny", [sys.executable, "-c", write.format(tmp_path / "tiny.json")], 30)
    assert good == {"ok": True, "summary": "fine"}
    crash = [sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"]
    died = gpu_check.run_child(tmp_path, "sd15", crash, 30)
    assert not died["ok"] and "killed by signal" in died["error"] and "Fatal Python error" in died["stderr_tail"]
    hung = gpu_check.run_child(tmp_path, "buffers", [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert not hung["ok"] and "1 s limit" in hung["error"]
    assert json.loads((tmp_path / "buffers.json").read_text())["error"] == hung["error"]
    assert gpu_check.summary_line("sd15", died).startswith("sd15: FAILED")


def test_compare_and_image_diff(bench):
    parts = bench[1]
    a = np.array([1.0, np.nan, 3.0])
    assert parts.compare(a, a.copy())["identical"]
    c = parts.compare(np.ones(4), np.ones(4) + 1e-3)
    assert not c["identical"] and c["max_abs"] == pytest.approx(1e-3) and not parts.within_graph_tolerance(c, np.ones(4))
    img = np.zeros((1, 3, 2, 2), np.float32)
    d = parts.image_diff(img + 0.1, img)  # 0.05 of the [0, 1] range: 140 vs 128 after rounding
    assert d["max_255"] == 12 and d["mean_255"] == 12 and d["psnr_db"] == pytest.approx(26.02, abs=0.01)
    assert not parts.image_ok(d)  # a mean difference of 12/255 is too much
    one = img.copy()
    one[0, 0, 0, 0] = 0.1
    assert parts.image_ok(parts.image_diff(one, img))  # max 12, mean 1/255
    one[0, 0, 0, 0] = 0.2
    assert not parts.image_ok(parts.image_diff(one, img))  # max 26/255


def test_buffers_part_dry_run(bench, fake, tmp_path):
    assert bench[0].main(["--out", str(tmp_path), "--part", "buffers"]) == 0  # what each child process runs
    r = json.loads((tmp_path / "buffers.json").read_text())
    assert r["ok"], json.dumps(r, indent=1, default=str)
    assert r["leaked_bytes"] == 0 and "cudaErrorMemoryAllocation" in r["copies"]["oom_error"]
    assert r["loop"]["steps_5"] and r["loop"]["steps_6"] and "noise has shape" in r["loop"]["bad_noise_error"]
    assert not any(fake.live().values())


class NumpyReference:
    """The CPU reference's interface (TorchBackend) over the numpy stand-in networks."""

    def __init__(self, tokenizer):
        self.tokenizer, self.config = tokenizer, CONFIG

    def encode_text(self, ids):
        return text_encoder(np.asarray(ids, np.int32))[0]

    def denoise(self, latents, context, schedule, guidance, noise):
        import torch
        from fake_cuda import model_output

        x = latents
        for i in range(schedule.num_steps):
            ctx = context if context.shape[0] == 2 * x.shape[0] else np.concatenate([context, context])
            mu, mc = np.split(model_output(np.concatenate([x, x]), float(schedule.timesteps[i]), ctx), 2)
            a, b, c = schedule.coefficients[i].astype(np.float32)
            x = (a * x + b * (mu + np.float32(guidance) * (mc - mu)) + (0 if noise is None else c * noise[i]))
        return torch.from_numpy(x.astype(np.float32))

    def decode(self, latents):
        return vae_decoder(latents.numpy())


def test_tiny_case_dry_run(bench, fake):
    from sdengine.backends.cuda_backend import CudaBackend
    from sdengine.specs import DENOISE_STEP, TEXT_ENCODER, VAE_DECODER, ShapeRanges
    from sdengine.tokenizer import ClipTokenizer

    models = bench[2]
    execs = {n: NumpyExecutor(n, fake) for n in (TEXT_ENCODER, DENOISE_STEP, VAE_DECODER)}
    cb = CudaBackend(CONFIG, ClipTokenizer.default(), execs, CudaDevice(), ShapeRanges.default(CONFIG))
    try:
        for i, case in enumerate(models.TINY_CASES):
            r = models.tiny_case(cb, NumpyReference(cb.tokenizer), case, seed=10 * i)
            assert r["ok"] and r["graph_vs_eager"]["identical"], r
            assert not r["cached_graph_new_inputs_vs_eager"]["max_abs"] and r["image_vs_cpu_fp32"]["max_255"] <= 1
        outside = models._outside_range(cb)
        assert outside["ok"] and "height 256 is outside the range 64..128" in outside["error"]
    finally:
        cb.close()
    assert not any(fake.live().values())


def test_sd15_timing_dry_run(bench, fake):
    from argparse import Namespace

    from sdengine.config import ModelConfig
    from sdengine.runtime.loop import DenoiseLoop
    from sdengine.specs import DENOISE_STEP

    cfg, device = ModelConfig.sd15(), CudaDevice()
    loop = DenoiseLoop(device, NumpyExecutor(DENOISE_STEP, fake), cfg)
    try:
        r = bench[2]._sd15_timings(Namespace(timing_steps=4, full_steps=6), cfg, device, loop)
    finally:
        loop.close()
        device.close()
    assert r["graph_ok"] and r["graph_vs_eager"]["identical"] and len(r["eager_step_ms"]) == 4
    assert r["graph_step_ms"] == pytest.approx(1.5 / 4) and r["full_steps"] == 6  # the stand-in's events say 1.5 ms
    assert not any(fake.live().values())


def test_tensorrt_part_skips_without_tensorrt(bench):
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("TensorRT is importable here")
    assert bench[2].part_tensorrt(None)["skipped"] == "TensorRT not installed: skipped"


# --- issue 17 item 5: every part has its own deadline; no TensorRT child without TensorRT ---------------------


def test_each_part_gets_its_own_slot_inside_the_budget(bench):
    gpu_check = bench[0]
    assert gpu_check.part_slot("buffers", ["tiny", "sd15"], 120) == 40            # its own cap
    assert gpu_check.part_slot("tiny", ["sd15"], 70) == 35                        # leaves sd15 its reserve
    assert gpu_check.part_slot("tiny", ["sd15"], 40) == 20                        # never under its minimum...
    assert gpu_check.part_slot("sd15", [], 15) == 15                              # ...nor past what is left
    assert all(gpu_check.PART_SECONDS[p] >= gpu_check.MIN_SECONDS[p] for p in gpu_check.PARTS)


def test_tensorrt_is_skipped_without_a_child_and_late_parts_are_skipped(bench, tmp_path, monkeypatch):
    from argparse import Namespace

    gpu_check = bench[0]
    started = []
    monkeypatch.setattr(gpu_check, "tensorrt_importable", lambda: False)
    monkeypatch.setattr(gpu_check, "run_child", lambda out, name, cmd, slot: started.append((name, cmd, slot))
                        or {"ok": True, "summary": name})
    (tmp_path / "summary.txt").write_text("")
    args = Namespace(budget_s=100.0, timing_steps=4, full_steps=6)
    results = gpu_check.run_parts(tmp_path, ["buffers", "sd15", "tensorrt"], args)
    assert [name for name, _, _ in started] == ["buffers", "sd15"]  # no process for TensorRT
    assert results["tensorrt"]["skipped"].startswith("TensorRT not installed")
    assert json.loads((tmp_path / "tensorrt.json").read_text())["skipped"]
    deadlines = [float(cmd[cmd.index("--deadline") + 1]) for _, cmd, _ in started]
    assert all(d > 0 for d in deadlines) and started[0][2] == 40 and started[1][2] == 90
    started.clear()
    results = gpu_check.run_parts(tmp_path, ["buffers", "tiny"], Namespace(budget_s=5.0, timing_steps=4, full_steps=6))
    assert not started and all("budget" in r["skipped"] for r in results.values())


def test_sd15_full_loop_is_skipped_when_the_deadline_is_near(bench, fake):
    import time
    from argparse import Namespace

    from sdengine.config import ModelConfig
    from sdengine.runtime.loop import DenoiseLoop
    from sdengine.specs import DENOISE_STEP

    cfg, device = ModelConfig.sd15(), CudaDevice()
    loop = DenoiseLoop(device, NumpyExecutor(DENOISE_STEP, fake), cfg)
    try:
        r = bench[2]._sd15_timings(Namespace(timing_steps=3, full_steps=50, deadline=time.time() + 1), cfg, device,
                                   loop)
    finally:
        loop.close()
        device.close()
    assert r["graph_ok"] and "full_eager" not in r and "past the part's deadline" in r["full_skipped"]
