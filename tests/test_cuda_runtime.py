"""The lean CUDA runtime: clear errors without GPU or libraries, and the loop's addressing on a stand-in device.

Without a GPU the real sdengine.runtime.cuda code runs over tests/fake_cuda.py's FakeRuntime (host
memory; captures record work for a graph to replay) with numpy executors that read and write by
address, so eager runs, captures, replays, ping-pong buffers, per-step rows and frees are all
exercised. Tests that need a real GPU skip.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from torch_block import BLOCK_TORCH

from sdengine.errors import BackendUnavailableError, CudaError, EngineMismatchError, InvalidInputError
from sdengine.runtime import cuda
from sdengine.runtime.device import CudaDevice
from sdengine.samplers import build_schedule, sampler_names
from sdengine.specs import DENOISE_STEP, TEXT_ENCODER, VAE_DECODER, VAE_ENCODER, ShapeRanges

real_rt = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
from fake_cuda import (CONFIG, OK, FakeRuntime, NumpyExecutor, blend_known, guided_output,  # noqa: E402
                       state_update, text_encoder, vae_decoder)

HAS_GPU = real_rt.cudaGetDeviceCount()[0] == OK and real_rt.cudaGetDeviceCount()[1] > 0


@pytest.fixture
def fake(monkeypatch) -> FakeRuntime:
    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "_RT", rt)
    return rt


def reference_loop(x, ctx2, schedule, g, noise, condition=None):
    """The sampler's recursion written out over its state: what the loop must compute through its buffers."""
    state = np.zeros((schedule.slots, *x.shape), np.float32)
    state[0] = x
    for i in range(schedule.num_rows):
        m = guided_output(state[0], float(np.float32(schedule.timesteps[i])), ctx2, g)
        z = np.zeros_like(x) if noise is None else noise[i]
        state = state_update(state, m, schedule.coefficients[i], z)
        if condition is not None:
            c = condition
            state = blend_known(state, c.mask, c.known, c.known_noise, c.blend[i])
    return state[0]


def _inputs(batch: int, steps: int, eta: float, seed: int, sampler: str = "ddim"):
    rng = np.random.default_rng(seed)
    schedule = build_schedule(CONFIG.scheduler, sampler, steps, eta=eta)
    x = rng.standard_normal((batch, 4, 4, 6), dtype=np.float32)
    ctx = rng.standard_normal((2 * batch, 77, CONFIG.text_encoder.hidden_size), dtype=np.float32)
    noise = rng.standard_normal((steps, *x.shape), dtype=np.float32) if eta else None
    return schedule, x, ctx, noise


def _loop(rt):
    from sdengine.runtime.loop import DenoiseLoop

    device = CudaDevice()
    return device, DenoiseLoop(device, NumpyExecutor(DENOISE_STEP, rt), CONFIG)


def _embeddings(device, ctx: np.ndarray, rows: int):
    from sdengine.runtime.loop import TextEmbeddings

    buf = device.empty(ctx.shape)
    device.upload(buf, ctx)
    return TextEmbeddings(buf, rows)


# --- clear errors without cuda-python, driver, GPU or TensorRT -----------------------------------------------

def test_import_cudart_without_cuda_python(monkeypatch):
    monkeypatch.setattr(cuda, "_RT", None)
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` of it fail
    with pytest.raises(BackendUnavailableError, match=r"cuda-python is not installed.*--backend onnxruntime"):
        cuda.import_cudart()


@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU: the no-driver path cannot be seen here")
def test_no_driver_is_backend_unavailable_naming_the_call():
    with pytest.raises(BackendUnavailableError, match=r"cudaGetDeviceCount failed: cudaError\w+ .*--backend onnxruntime"):
        CudaDevice()
    with pytest.raises(BackendUnavailableError, match=r"cudaMalloc\(64 bytes\) failed"):
        cuda.DeviceBuffer((16,), np.float32)


def test_check_unwraps_values_and_names_the_failing_call():
    e = real_rt.cudaError_t
    assert cuda.check((OK,), "cudaFree") is None
    assert cuda.check((OK, 7), "cudaMalloc") == 7
    assert cuda.check((OK, 1, 2), "cudaMemGetInfo") == (1, 2)
    with pytest.raises(CudaError) as info:
        cuda.check((e.cudaErrorMemoryAllocation, None), "cudaMalloc(1024 bytes)")
    assert str(info.value) == "cudaMalloc(1024 bytes) failed: cudaErrorMemoryAllocation (out of memory)"
    with pytest.raises(BackendUnavailableError, match=r"cudaSetDevice\(0\) failed: cudaErrorNoDevice .*onnxruntime"):
        cuda.check((e.cudaErrorNoDevice,), "cudaSetDevice(0)")


def test_tensorrt_backend_unavailable_from_load_backend():
    pytest.importorskip("sdengine.runtime.tensorrt")
    from sdengine.backends import load_backend
    from sdengine.backends.tensorrt_backend import device_index

    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("TensorRT is importable here")
    with pytest.raises(BackendUnavailableError, match="--backend onnxruntime"):
        load_backend("engines/none", backend="tensorrt", device="cuda")
    assert device_index("cuda") == 0 and device_index("cuda:3") == 3
    with pytest.raises(InvalidInputError, match="NVIDIA GPU"):
        device_index("cpu")


def test_generate_with_tensorrt_fails_in_one_line_without_torch(tmp_path):
    code = BLOCK_TORCH + "from sdengine.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    r = subprocess.run([sys.executable, "-c", code, "generate", "a cat", "--backend", "tensorrt", "--model",
                        str(tmp_path), "--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdengine: error:") and "--backend onnxruntime" in lines[0]
    assert not (tmp_path / "x.png").exists()


# --- the CUDA layer over the stand-in runtime ----------------------------------------------------------------

def test_buffers_round_trip_and_free_everything_at_close(fake):
    device = CudaDevice()
    assert device.info.name == "Fake GPU" and device.info.compute_capability == "9.0"
    a = device.empty((3, 5))
    b = device.empty((3, 5))
    data = np.arange(15, dtype=np.float32).reshape(3, 5)
    device.upload(a, data)
    device.copy(b.ptr, a.row(1), 2 * 5 * 4)  # rows 1..2 of a into rows 0..1 of b
    device.zero(a)
    assert np.array_equal(device.download(b, rows=2), data[1:])
    assert not device.download(a).any()
    assert a.__cuda_array_interface__ == {"shape": (3, 5), "typestr": "<f4", "data": (a.ptr, False),
                                          "version": 3, "strides": None, "stream": None}
    b.free()
    b.free()  # idempotent
    with pytest.raises(Exception, match="was freed"):
        b.ptr
    assert device.memory.allocated == 2 + 2 and device.memory.freed == 1  # two buffers, two pinned stagings
    with pytest.raises(InvalidInputError, match="cannot upload"):
        device.upload(a, np.zeros((2, 5), np.float32))
    device.close()
    device.close()  # idempotent
    assert fake.live() == {"device": 0, "pinned": 0, "streams": 0, "events": 0, "graphs": 0, "execs": 0}


def test_failed_capture_is_ended_and_leaves_nothing(fake):
    device = CudaDevice()
    buf = device.empty((4,))

    def bad():
        device.zero(buf)
        raise RuntimeError("executor failed")

    with pytest.raises(RuntimeError, match="executor failed"):
        device.capture(bad)
    assert not device.stream.is_capturing() and not fake.graphs and not fake.execs
    fake.invalidate = True
    with pytest.raises(CudaError, match="cudaStreamEndCapture failed: cudaErrorStreamCaptureInvalidated"):
        device.capture(lambda: device.zero(buf))
    device.close()
    assert not any(fake.live().values())


def test_graphs_are_instantiated_to_free_their_allocations_on_relaunch(fake):
    """Issue 17 item 6: cudaGraphInstantiateFlagAutoFreeOnLaunch, the real enum of cuda-bindings' runtime."""
    flag = int(real_rt.cudaGraphInstantiateFlags.cudaGraphInstantiateFlagAutoFreeOnLaunch)
    assert flag == 1  # CUDA's value of the flag (driver_types.h)
    device = CudaDevice()
    buf = device.empty((4,))
    graph = device.capture(lambda: device.zero(buf))
    graph.launch()
    assert fake.instantiate_flags == [flag]
    assert graph.mode == "ThreadLocal" and graph.capture_errors == []
    device.close()


def test_a_capture_forbidden_call_is_retried_once_in_relaxed_mode(fake):
    """Issue 17 item 7: a thread-local failure is named and retried relaxed; the graph says which mode held."""
    modes = real_rt.cudaStreamCaptureMode
    device = CudaDevice()
    a, b = device.empty((4,)), device.empty((4,))
    device.upload(a, np.arange(4, dtype=np.float32))
    fake.invalidate = {"ThreadLocal"}  # what a sync or a plain cudaMalloc inside the capture does
    graph = device.capture(lambda: device.copy(b.ptr, a.ptr, a.nbytes))
    assert fake.capture_modes == [modes.cudaStreamCaptureModeThreadLocal, modes.cudaStreamCaptureModeRelaxed]
    assert graph.mode == "Relaxed" and graph.capture_errors == ["cudaErrorStreamCaptureInvalidated"]
    assert fake.last_error_reads == 1  # the failed try's error was cleared before the retry
    graph.launch()
    np.testing.assert_array_equal(device.download(b), np.arange(4, dtype=np.float32))
    device.close()
    assert not any(fake.live().values())


def test_a_capture_failing_in_both_modes_names_both_errors(fake):
    device = CudaDevice()
    buf = device.empty((4,))
    fake.invalidate = True  # fails relaxed too: a kernel fault or a failed launch, not a forbidden call
    with pytest.raises(CudaError, match=r"thread-local mode \(cudaErrorStreamCaptureInvalidated\) and again in "
                                        r"relaxed mode \(cudaErrorStreamCaptureInvalidated\)") as info:
        device.capture(lambda: device.zero(buf))
    assert info.value.capture_errors == ["cudaErrorStreamCaptureInvalidated"] * 2
    assert len(fake.capture_modes) == 2 and not fake.capturing and not fake.graphs and not fake.execs
    device.close()


def test_an_executor_error_in_a_capture_is_not_retried(fake):
    device = CudaDevice()
    calls = []

    def bad():
        calls.append(1)
        raise RuntimeError("executor failed")

    with pytest.raises(RuntimeError, match="executor failed"):
        device.capture(bad)
    assert len(calls) == 1 and len(fake.capture_modes) == 1
    device.close()


def test_relaxed_capture_mode_is_restored_even_on_error(fake):
    modes = real_rt.cudaStreamCaptureMode
    with cuda.relaxed_capture_mode():
        assert fake.thread_mode == modes.cudaStreamCaptureModeRelaxed
    assert fake.thread_mode == modes.cudaStreamCaptureModeGlobal
    with pytest.raises(RuntimeError, match="inside"):
        with cuda.relaxed_capture_mode():
            raise RuntimeError("inside")
    assert fake.thread_mode == modes.cudaStreamCaptureModeGlobal


# --- the denoise loop: ping-pong, per-step rows, one graph per key -------------------------------------------

@pytest.mark.parametrize("batch, steps, eta", [(1, 5, 0.0), (2, 4, 1.0), (1, 1, 0.0)])
def test_loop_eager_and_replayed_graph_follow_the_recursion(fake, batch, steps, eta):
    device, loop = _loop(fake)
    schedule, x, ctx, noise = _inputs(batch, steps, eta, seed=batch * 10 + steps)
    want = reference_loop(x, ctx, schedule, 7.5, noise)
    emb = _embeddings(device, ctx, 2 * batch)
    eager = loop.launch(loop.prepare(x, emb, schedule, 7.5, noise), graph=False)
    state_shape = (schedule.slots, *x.shape)
    assert eager.base is loop.buffer(("state_a", "state_b")[steps % 2], state_shape)  # N even: the first buffer
    eager_out = device.download(eager)
    np.testing.assert_allclose(eager_out, want, rtol=1e-6, atol=1e-6)
    done = []
    graph_out = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, noise), lambda i, n: done.append(i),
                                            graph=True))
    assert np.array_equal(graph_out, eager_out) and done == [steps] and len(loop.graphs) == 1
    # a second call with other data replays the same graph through the same buffers
    schedule2, x2, ctx2, noise2 = _inputs(batch, steps, eta, seed=99)
    device.upload(emb.buffer, ctx2)
    runs = loop.step.runs
    replay = device.download(loop.launch(loop.prepare(x2, emb, schedule2, 3.0, noise2), graph=True))
    assert loop.step.runs - runs == steps and len(loop.graphs) == 1 and len(fake.execs) == 1
    np.testing.assert_allclose(replay, reference_loop(x2, ctx2, schedule2, 3.0, noise2), rtol=1e-6, atol=1e-6)
    loop.close()
    device.close()
    assert not any(fake.live().values())


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_runs_as_one_captured_loop(fake, sampler):
    """Each sampler's table through the loop: eager equals the recursion, the captured graph equals eager."""
    device, loop = _loop(fake)
    steps = 4 if sampler == "lcm" else 6
    schedule, x, ctx, _ = _inputs(2, steps, 0.0, seed=7, sampler=sampler)
    noise = np.random.default_rng(8).standard_normal((schedule.num_rows, *x.shape), dtype=np.float32) \
        if schedule.needs_noise else None
    emb = _embeddings(device, ctx, 4)
    want = reference_loop(x, ctx, schedule, 7.5, noise)
    eager = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, noise), graph=False))
    np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-5)
    runs = loop.step.runs
    graph = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, noise), graph=True))
    assert np.array_equal(graph, eager) and len(loop.graphs) == 1
    assert loop.step.runs - runs == schedule.num_rows + 1  # the warm-up row, then the captured loop once
    loop.close()
    device.close()
    assert not any(fake.live().values())


def test_inpainting_condition_runs_inside_the_captured_loop(fake):
    """The mask, known latent and per-row blend go through the same buffers: graph replay equals eager and the
    recursion, and a text-to-image call after it (zeroed condition) replays the same graph."""
    from sdengine.backends import ImageCondition

    device, loop = _loop(fake)
    schedule, x, ctx, _ = _inputs(2, 5, 0.0, seed=9, sampler="dpmpp_2m")
    rng = np.random.default_rng(10)
    cond = ImageCondition((rng.uniform(size=(2, 1, 4, 6)) > 0.5).astype(np.float32),
                          rng.standard_normal(x.shape, dtype=np.float32), rng.standard_normal(x.shape, dtype=np.float32),
                          np.concatenate([schedule.levels[1:], np.ones((schedule.num_rows, 1))], 1).astype(np.float32))
    emb = _embeddings(device, ctx, 4)
    want = reference_loop(x, ctx, schedule, 7.5, None, cond)
    eager = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, None, cond), graph=False))
    np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-5)
    graph = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, None, cond), graph=True))
    assert np.array_equal(graph, eager)
    plain = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, None), graph=True))
    np.testing.assert_allclose(plain, reference_loop(x, ctx, schedule, 7.5, None), rtol=1e-5, atol=1e-5)
    assert len(loop.graphs) == 1
    loop.close()
    device.close()
    assert not any(fake.live().values())


def test_loop_duplicates_b_text_rows_for_guidance_one(fake):
    device, loop = _loop(fake)
    schedule, x, ctx, _ = _inputs(2, 3, 0.0, seed=5)
    cond = ctx[:2]
    out = loop.run(x, _embeddings(device, cond, 2), schedule, 1.0, None)
    want = reference_loop(x, np.concatenate([cond, cond]), schedule, 1.0, None)
    np.testing.assert_allclose(device.download(out), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(InvalidInputError, match="3 text rows for 2 latents"):
        loop.run(x, _embeddings(device, ctx[:3], 3), schedule, 7.5, None)
    with pytest.raises(InvalidInputError, match="noise has shape"):
        loop.run(x, _embeddings(device, ctx, 4), schedule, 7.5, np.zeros((2, 2, 4, 4, 6), np.float32))
    device.close()


def test_a_shape_change_never_replays_a_graph_of_another_shape_on_one_context(fake):
    """Issue 17 item 8: with graphs_follow_shapes (a TensorRT engine's one context), binding another key drops the
    graphs captured before; the first key is captured again when it comes back, and every result is right."""
    from sdengine.runtime.tensorrt import TrtEngine

    assert TrtEngine.graphs_follow_shapes is True
    device, loop = _loop(fake)
    loop.step.graphs_follow_shapes = True
    launches = []
    original = device.capture

    def capture(enqueue):
        graph = original(enqueue)
        launch = graph.launch
        graph.launch = lambda: (launches.append(graph), launch())
        return graph

    device.capture = capture
    results = []
    for batch, steps in ((1, 3), (2, 3), (1, 3), (1, 3)):
        schedule, x, ctx, _ = _inputs(batch, steps, 0.0, seed=batch)
        out = loop.run(x, _embeddings(device, ctx, 2 * batch), schedule, 7.5, None)
        np.testing.assert_allclose(device.download(out), reference_loop(x, ctx, schedule, 7.5, None),
                                   rtol=1e-6, atol=1e-6)
        assert len(loop.graphs) == 1
        results.append(next(iter(loop.graphs)))
    assert [k.shape[1] for k in results] == [1, 2, 1, 1]
    assert len(set(map(id, launches))) == 3  # batch 1, batch 2, batch 1 again (recaptured); the last call replays
    assert launches[2] is not launches[0] and launches[3] is launches[2]
    assert len(fake.execs) == 1  # the dropped graphs were destroyed
    device.close()


def test_graphs_of_several_keys_are_kept_when_the_executor_allows(fake):
    device, loop = _loop(fake)
    for batch in (1, 2, 1):
        schedule, x, ctx, _ = _inputs(batch, 3, 0.0, seed=batch)
        loop.run(x, _embeddings(device, ctx, 2 * batch), schedule, 7.5, None)
    assert len(loop.graphs) == 2 and len(fake.execs) == 2
    device.close()


def test_executor_failing_inside_capture_caches_no_graph(fake):
    device, loop = _loop(fake)
    schedule, x, ctx, _ = _inputs(1, 3, 0.0, seed=1)
    emb = _embeddings(device, ctx, 2)
    step, calls = loop.step, []
    original = step.execute

    def failing(stream):
        calls.append(stream)
        if stream in fake.capturing and len(calls) == 3:
            raise RuntimeError("engine failed")
        original(stream)

    step.execute = failing
    with pytest.raises(RuntimeError, match="engine failed"):
        loop.run(x, emb, schedule, 7.5, None)
    assert not loop.graphs and not fake.capturing and not fake.graphs
    step.execute = original
    np.testing.assert_allclose(device.download(loop.run(x, emb, schedule, 7.5, None)),
                               reference_loop(x, ctx, schedule, 7.5, None), rtol=1e-6, atol=1e-6)
    device.close()
    assert not any(fake.live().values())


# --- the backend: text encoder, loop and VAE on one stream; errors free everything ---------------------------

def _backend(rt, ranges=None):
    from sdengine.backends.cuda_backend import CudaBackend
    from sdengine.tokenizer import ClipTokenizer

    execs = {name: NumpyExecutor(name, rt) for name in (TEXT_ENCODER, DENOISE_STEP, VAE_DECODER, VAE_ENCODER)}
    return CudaBackend(CONFIG, ClipTokenizer.default(), execs, CudaDevice(), ranges)


def test_pipeline_over_the_cuda_backend_matches_the_numpy_recursion(fake):
    from sdengine.pipeline import Pipeline, initial_noise, to_uint8

    backend = _backend(fake)
    pipe = Pipeline(backend)
    for guidance, eta in ((7.5, 0.0), (1.0, 1.0)):
        result = pipe("a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=guidance,
                      eta=eta, seed=11, height=64, width=72)
        schedule = build_schedule(CONFIG.scheduler, "ddim", 3, eta)
        x, noise = initial_noise([11], (4, 8, 9), schedule)
        x = x * np.float32(schedule.init_scale)
        rows = ["blue", "a red circle"] if guidance > 1.0 else ["a red circle", "a red circle"]
        ctx = text_encoder(backend.tokenizer(rows).astype(np.int32))[0]
        want = to_uint8(vae_decoder(reference_loop(x, ctx, schedule, guidance, noise)))
        assert np.array_equal(np.asarray(result.images[0]), want[0])
    assert len(backend.loop.graphs) == 2  # one per (shape, steps, noise)
    executors = list(backend.executors.values())
    backend.close()
    assert all(e.closed for e in executors) and not any(fake.live().values())


def test_image_to_image_over_the_cuda_backend(fake):
    """The VAE encoder executor and the loop from a noised image latent: the numpy recursion's picture."""
    from PIL import Image

    from fake_cuda import vae_encoder
    from sdengine.images import prepare
    from sdengine.pipeline import Pipeline, initial_noise, to_uint8

    backend = _backend(fake)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 72, 3), dtype=np.uint8))
    result = Pipeline(backend)("a red circle", image=picture, strength=0.6, num_inference_steps=5, seed=2,
                               guidance_scale=1.0)
    schedule = build_schedule(CONFIG.scheduler, "ddim", 5, strength=0.6)
    unit, _ = initial_noise([2], (4, 8, 9), schedule)
    x0 = vae_encoder(prepare(picture, None, 8, None, None).pixels)[0]
    init = (schedule.levels[0, 0] * x0 + schedule.levels[0, 1] * unit).astype(np.float32)
    ids = backend.tokenizer(["a red circle"] * 2).astype(np.int32)
    want = to_uint8(vae_decoder(reference_loop(init, text_encoder(ids)[0], schedule, 1.0, None)))
    assert schedule.num_rows == 3 and np.abs(np.asarray(result.images[0]).astype(int) - want[0]).max() <= 1
    backend.close()
    assert not any(fake.live().values())


def test_backend_rejects_shapes_outside_the_engines_and_frees_all(fake):
    ranges = ShapeRanges.default(CONFIG)  # 64..128 px, 1..4 images for the tiny model
    backend = _backend(fake, ranges)
    with pytest.raises(InvalidInputError, match=r"height 256 is outside the range 64\.\.128 .*sdengine build"):
        backend.decode(np.zeros((1, 4, 32, 8), np.float32))
    backend.executors[VAE_DECODER].output_shape = lambda name: (1, 3, 1, 1)
    with pytest.raises(EngineMismatchError, match="rebuild it with sdengine build"):
        backend.decode(np.zeros((1, 4, 8, 8), np.float32))
    backend.close()
    assert not any(fake.live().values())


def test_failed_allocation_mid_call_leaks_nothing(monkeypatch):
    rt = FakeRuntime(fail_malloc_at=6)
    monkeypatch.setattr(cuda, "_RT", rt)
    backend = _backend(rt)
    schedule, x, ctx, _ = _inputs(1, 2, 0.0, seed=3)
    with pytest.raises(CudaError, match=r"cudaMalloc\(\d+ bytes\) failed: cudaErrorMemoryAllocation"):
        backend.denoise(x, backend.encode_text(np.zeros((2, 77), np.int32)), schedule, 7.5, None)
    backend.close()
    assert not any(rt.live().values())


# --- on a real GPU ---------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA GPU and driver here (cudaGetDeviceCount fails)")


def _gpu_round_trip() -> None:
    with CudaDevice() as device:
        a, b = device.empty((1 << 20,)), device.empty((1 << 20,))
        data = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)
        device.upload(a, data)
        graph = device.capture(lambda: device.copy(b.ptr, a.ptr, a.nbytes))
        device.zero(b)
        graph.launch()
        assert np.array_equal(device.download(b), data)
        start, end = cuda.Event(), cuda.Event()
        start.record(device.stream)
        graph.launch()
        end.record(device.stream)
        assert start.elapsed_ms(end) >= 0
        start.destroy()
        end.destroy()
    assert device.memory.live == 0


@gpu
def test_gpu_round_trip_graph_replay_and_no_leak():
    _gpu_round_trip()  # the first round may leave what the driver sets up once (modules, graph support)
    free_before = cuda.memory_info()[0]
    _gpu_round_trip()
    assert abs(cuda.memory_info()[0] - free_before) < (2 << 20)


# --- the PyTorch stand-in executor's CPU-side logic --------------------------------------------------------------

def test_torch_executor_shapes_and_fp16_body():
    torch = pytest.importorskip("torch")
    from torch import nn

    from sdengine.backends.torch_executor import TorchExecutor, with_fp16_body
    from sdengine.errors import SDEngineError
    from sdengine.specs import GRAPHS

    vae = TorchExecutor(GRAPHS[VAE_DECODER], None, CONFIG)
    with pytest.raises(SDEngineError, match="set the input shapes first"):
        vae.output_shape("image")
    vae.set_input_shape("latent", (2, 4, 8, 9))
    assert vae.output_shape("image") == (2, 3, 64, 72)
    with pytest.raises(InvalidInputError, match="cannot take shape"):
        vae.set_input_shape("latent", (2, 3, 8, 9))  # the model's latents have 4 channels
    te = TorchExecutor(GRAPHS[TEXT_ENCODER], None, CONFIG)
    te.set_input_shape("input_ids", (3, 77))
    assert te.output_shape("last_hidden_state") == (3, 77, CONFIG.text_encoder.hidden_size)
    with pytest.raises(SDEngineError, match="was closed"):
        vae.execute(0)

    class Graph(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.head(self.body(x / 2))

    g = with_fp16_body(Graph(), ("body",))
    assert g.body.net.weight.dtype == torch.float16 and g.head.weight.dtype == torch.float32
    assert g(torch.ones(2, 4)).dtype == torch.float32  # fp32 edges around the fp16 body


def test_long_weighted_prompt_over_the_cuda_backend(fake):
    """A 2-chunk weighted prompt: the loop binds text embeddings [2B, 154, D] and its key holds their length."""
    from sdengine.pipeline import Pipeline, initial_noise, to_uint8
    from sdengine.prompts import apply_emphasis, prompt_batch

    ranges = ShapeRanges.default(CONFIG)
    backend = _backend(fake, ranges)
    prompt = " ".join(["red"] * 75) + " a (circle:1.4)"
    result = Pipeline(backend)(prompt, negative_prompt="blue", num_inference_steps=3, seed=5, height=64, width=64)
    schedule = build_schedule(CONFIG.scheduler, "ddim", 3, 0.0)
    x, _ = initial_noise([5], (4, 8, 8), schedule)
    x = x * np.float32(schedule.init_scale)
    ids, weights = prompt_batch(backend.tokenizer, ["blue", prompt])
    hidden = np.stack([text_encoder(ids[:, c].astype(np.int32))[0] for c in range(2)], axis=1)
    ctx = apply_emphasis(hidden, weights)
    assert ctx.shape[1] == 154
    want = to_uint8(vae_decoder(reference_loop(x, ctx, schedule, 7.5, None)))
    assert np.array_equal(np.asarray(result.images[0]), want[0])
    assert [k.context for k in backend.loop.graphs] == [154]
    short = ShapeRanges(ranges.batch, ranges.height, ranges.width, chunks=1)
    backend.ranges = short
    with pytest.raises(InvalidInputError, match=r"needs 2 chunks .* reads 1\.\.1: re-export with sdengine export "
                                                r"--max-prompt-chunks 2 or more .* and rebuild the engines"):
        Pipeline(backend)(prompt, num_inference_steps=1, height=64, width=64)
    backend.close()
    assert not any(fake.live().values())
