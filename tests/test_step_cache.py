"""Step caching (DeepCache): the torch loop against the `deepcache` package's DeepCacheSDHelper on diffusers'
pipeline (same tiny weights, latents and settings), and the ONNX Runtime loop against torch."""

from __future__ import annotations

import numpy as np
import pytest

import sdengine
from diffusers_support import pixels
from onnx_support import onnx_fp32_dir, ort_pipeline  # noqa: F401  (session fixtures)
from sdengine.stepcache import StepCache, cache_split, check_step_cache

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE, STEPS = "a photo of a red cat", "blurry", 6
SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
              "euler": ("EulerDiscreteScheduler", {})}
MAX_PIXEL_DIFF = 2  # fp32 on the CPU, as every diffusers parity test (test_pipeline.py)
# The same comparison in float ([0, 1] image units): measured worst 1.4e-6 over the three cases below (diffusers'
# own uncached pipeline is as far from ours); caching moves these images by 5.2e-4 to 4.3e-2.
FLOAT_TOL = 5e-5


def _latents() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)


def deepcache_images(pipe, sampler: str, interval: int | None, branch: int) -> np.ndarray:
    """diffusers' pipeline with DeepCacheSDHelper(cache_interval, cache_branch_id) enabled (None: plain); float
    images [N, H, W, 3] in [0, 1]."""
    deepcache = pytest.importorskip("DeepCache")
    base = dict(pipe.scheduler.config)
    cls, overrides = SCHEDULERS[sampler]
    pipe.scheduler = getattr(diffusers, cls).from_config(base, **overrides)
    helper = deepcache.DeepCacheSDHelper(pipe=pipe)
    if interval is not None:
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
    try:
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                   latents=torch.from_numpy(_latents()), output_type="np")
    finally:
        if interval is not None:
            helper.disable()
        pipe.scheduler = diffusers.DDIMScheduler.from_config(base)
    return out.images


def ours(pipe, sampler: str, interval: int | None, branch: int | None, output_type: str = "pil") -> np.ndarray:
    result = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5,
                  latents=_latents(), scheduler=sampler, cache_interval=interval, cache_branch=branch,
                  output_type=output_type)
    return result.images if output_type == "np" else pixels(result)


def to_levels(images: np.ndarray) -> np.ndarray:
    return (images * 255).round().astype(np.int16)


@pytest.mark.parametrize("sampler,interval,branch", [("ddim", 2, 0), ("dpmpp_2m", 3, 4), ("euler", 2, 8)])
def test_torch_matches_deepcache_helper(tiny_pipeline, diffusers_pipe, sampler, interval, branch):
    """Same weights, latents, sampler: DeepCacheSDHelper's image within 2/255 per pixel, and within FLOAT_TOL in
    float, while caching moves the image by more than 10 x FLOAT_TOL: the agreement is the cache's."""
    expected = deepcache_images(diffusers_pipe, sampler, interval, branch)
    plain = deepcache_images(diffusers_pipe, sampler, None, 0)
    got = ours(tiny_pipeline, sampler, interval, branch, "np")
    diff, effect = np.abs(got - expected).max(), np.abs(expected - plain).max()
    levels = np.abs(to_levels(got) - to_levels(expected)).max()
    print(f"\nparity step cache {sampler} interval {interval} branch {branch} vs DeepCacheSDHelper: max {levels}/255, "
          f"{diff:.1e} in float (caching itself moves the image by {effect:.1e})")
    assert to_levels(expected).std() > 5
    assert levels <= MAX_PIXEL_DIFF and diff < FLOAT_TOL and effect > 10 * FLOAT_TOL


def test_interval_one_is_the_plain_loop_and_arguments_are_checked(tiny_pipeline):
    plain = ours(tiny_pipeline, "ddim", None, None)
    assert np.array_equal(ours(tiny_pipeline, "ddim", 1, None), plain)
    r = tiny_pipeline(PROMPT, num_inference_steps=3, latents=_latents(), cache_interval=3, cache_branch=2)
    assert "DeepCache interval: 3, DeepCache branch: 2" in r.images[0].info["parameters"]
    assert r.images[0].info["cache_interval"] == "3"
    unet = tiny_pipeline.config.unet
    for interval, branch, match in ((0, None, "cache_interval"), (2.5, None, "cache_interval"),
                                    (True, None, "cache_interval"), (2, 9, r"0\.\.8"), (2, -1, "cache_branch"),
                                    (None, 1, "cache_interval >= 2"), (1, 0, "cache_interval >= 2")):
        with pytest.raises(sdengine.InvalidInputError, match=match):
            check_step_cache(interval, branch, unet)
    assert check_step_cache(2, None, unet) == StepCache(2, 0)
    with pytest.raises(sdengine.InvalidInputError, match="cache_branch"):
        tiny_pipeline(PROMPT, num_inference_steps=2, cache_interval=2, cache_branch=99)


def test_split_geometry():
    """The cut of each branch on the tiny U-Net (3 blocks of 32, 64, 64 channels, 2 layers each) and SD 1.5's."""
    from sdengine.config import UNetConfig

    tiny = UNetConfig.tiny()
    # branch 0: only conv_in's skip is fresh; the feature is the last up layer's input, at full size
    assert cache_split(tiny, 0) == type(cache_split(tiny, 0))(0, 0, 10, 32, 0)
    assert cache_split(tiny, 8).up_start == 0 and cache_split(tiny, 8).level == 2  # the mid block's output
    assert cache_split(tiny, 5).feature_shape(2, 9, 8) == (2, 64, 5, 4)  # the upsampled deeper block's output
    sd = cache_split(UNetConfig(), 0)
    assert (sd.down_ops, sd.channels, sd.level) == (0, 320, 0)


# --- ONNX Runtime: the full and shallow step graphs, exported on request -------------------------------------
BRANCH = 4  # block 1, layer 1 of the tiny U-Net: down layers and up layers on both sides of a resolution change


@pytest.fixture(scope="module")
def cache_export(tiny_model_dir, onnx_fp32_dir, tmp_path_factory):
    """The session's fp32 export with step caching's two graphs added (the others are up to date)."""
    from onnx_support import copy_export

    from sdengine.export import ExportSettings, export_model

    out = copy_export(onnx_fp32_dir, tmp_path_factory.mktemp("step-cache") / "onnx")
    results = export_model(tiny_model_dir, out, ExportSettings(graphs=("denoise_step",), step_cache=BRANCH),
                           log=lambda line: None)
    return out, {r.graph: r.status for r in results}


def test_onnxruntime_alternates_the_two_graphs_as_torch(cache_export, tiny_pipeline, ort_pipeline):
    out, statuses = cache_export
    assert statuses == {"denoise_step": "up to date", "denoise_step_full": "passed", "denoise_step_shallow": "passed"}
    pipe = sdengine.load_pipeline(out, backend="onnxruntime")
    for sampler, interval in (("ddim", 2), ("dpmpp_2m", 3)):
        got, ref = ours(pipe, sampler, interval, BRANCH), ours(tiny_pipeline, sampler, interval, BRANCH)
        diff = np.abs(got - ref).max()
        print(f"\nparity step cache onnxruntime vs torch, {sampler} interval {interval}: max {diff}/255")
        assert diff <= MAX_PIXEL_DIFF
    assert not np.array_equal(got, ours(pipe, "dpmpp_2m", None, None))
    with pytest.raises(sdengine.InvalidInputError, match=f"--step-cache 0|cache_branch {BRANCH}"):
        pipe(PROMPT, num_inference_steps=2, cache_interval=2, cache_branch=0)
    with pytest.raises(sdengine.InvalidInputError, match="--step-cache"):  # an export without the two graphs
        ort_pipeline(PROMPT, num_inference_steps=2, cache_interval=2)


def test_cli_runs_the_cached_export_without_torch(cache_export, tmp_path):
    from onnx_support import run_cli

    out, _ = cache_export
    png = tmp_path / "cached.png"
    r = run_cli("generate", "a red circle", "--backend", "onnxruntime", "--model", str(out), "--steps", "4",
                "--cache-interval", "2", "--cache-branch", str(BRANCH), "--seed", "1", "--out", str(png),
                torch_blocked=True)
    assert r.returncode == 0, r.stderr + r.stdout
    from PIL import Image

    assert f"DeepCache interval: 2, DeepCache branch: {BRANCH}" in Image.open(png).info["parameters"]


# --- the lean CUDA runtime's loop on the host-memory stand-in (no GPU here) ----------------------------------
def test_cuda_loop_alternates_full_and_shallow_executors(monkeypatch):
    """CachedDenoiseLoop over numpy executors that read and write by address: eager and the captured graph follow
    the cached recursion, one captured graph per key; unverified with TensorRT engines on a GPU."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from fake_cuda import CONFIG, FakeRuntime, NumpyExecutor, guided_output, state_update

    from sdengine.runtime import cuda
    from sdengine.runtime.device import CudaDevice
    from sdengine.runtime.loop import CachedDenoiseLoop, TextEmbeddings
    from sdengine.samplers import build_schedule
    from sdengine.specs import DENOISE_STEP, DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, spec_of

    rt = FakeRuntime()
    monkeypatch.setattr(cuda, "_RT", rt)
    cache = StepCache(3, 2)
    split = cache_split(CONFIG.unet, cache.branch)

    def feature_of(x, t):  # a stand-in deep feature [2B, C, h', w'] of the latent and the timestep
        rows = np.tanh(np.concatenate([x, x]).mean(axis=(1, 2, 3)) + t / 1000.0)
        return np.broadcast_to(rows[:, None, None, None], split.feature_shape(2 * x.shape[0], *x.shape[2:]))

    def shallow_output(x, t, ctx2, g, feature):
        return guided_output(x, t, ctx2, g) * np.float32(0.5) + feature.mean(axis=(1, 2, 3))[:x.shape[0], None, None,
                                                                                            None].astype(np.float32)

    def run(v, full):
        t, g = float(v["timestep"][0]), v["guidance_scale"][0]
        if full:
            m = guided_output(v["state"][0], t, v["text_embeddings"], g)
            out = {"deep_feature": feature_of(v["state"][0], t)}
        else:
            m, out = shallow_output(v["state"][0], t, v["text_embeddings"], g, v["deep_feature"]), {}
        out["next_state"] = state_update(v["state"], m, v["coefficients"], v["noise"])
        return out

    class Step(NumpyExecutor):
        def __init__(self, name):
            super().__init__(DENOISE_STEP, rt)
            self.spec, self.fn = spec_of(name), (lambda v: run(v, name == DENOISE_STEP_FULL))

        def output_shape(self, name):
            return self.shapes["state"] if name == "next_state" else split.feature_shape(
                self.shapes["text_embeddings"][0], *self.shapes["state"][3:])

    schedule = build_schedule(CONFIG.scheduler, "dpmpp_2m", 7)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 6), dtype=np.float32)
    ctx = rng.standard_normal((4, 77, CONFIG.text_encoder.hidden_size), dtype=np.float32)
    state, feature = np.zeros((schedule.slots, *x.shape), np.float32), None
    state[0] = x
    for i in range(schedule.num_rows):
        t = float(np.float32(schedule.timesteps[i]))
        if cache.full(i):
            m, feature = guided_output(state[0], t, ctx, 7.5), feature_of(state[0], t)
        else:
            m = shallow_output(state[0], t, ctx, 7.5, feature)
        state = state_update(state, m, schedule.coefficients[i], np.zeros_like(x))
    device = CudaDevice()
    full, shallow = Step(DENOISE_STEP_FULL), Step(DENOISE_STEP_SHALLOW)
    loop = CachedDenoiseLoop(device, full, shallow, CONFIG, cache)
    buf = device.empty(ctx.shape)
    device.upload(buf, ctx)
    emb = TextEmbeddings(buf, 4)
    eager = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, None), graph=False))
    np.testing.assert_allclose(eager, state[0], rtol=1e-5, atol=1e-5)
    assert (full.runs, shallow.runs) == (3, 4)  # rows 0, 3, 6 full
    graph = device.download(loop.launch(loop.prepare(x, emb, schedule, 7.5, None), graph=True))
    assert np.array_equal(graph, eager) and len(loop.graphs) == 1 and len(rt.execs) == 1
    assert (full.runs, shallow.runs) == (3 + 1 + 3, 4 + 1 + 4)  # a warm-up row on each, then the captured loop
    loop.close()
    device.close()
    assert not any(rt.live().values())


def test_server_fields_are_checked_against_what_the_backend_runs():
    import dataclasses

    from sdengine.serve.schema import Limits, RequestError, validate

    limits = Limits(factor=8, default_size=(64, 64), max_cache_branch=8)
    r = validate({"prompt": "a cat", "cache_interval": 3, "cache_branch": 4}, limits)
    assert (r.cache_interval, r.cache_branch) == (3, 4)
    assert r.batch_key != validate({"prompt": "a cat", "cache_interval": 3}, limits).batch_key
    export, none = dataclasses.replace(limits, cache_branches=(4,)), dataclasses.replace(limits, cache_branches=())
    assert validate({"prompt": "a cat", "cache_interval": 2, "cache_branch": 4}, export).cache_branch == 4
    for body, where, param in (({"cache_branch": 2}, limits, "cache_branch"),
                               ({"cache_interval": 2, "cache_branch": 9}, limits, "cache_branch"),
                               ({"cache_interval": 0}, limits, "cache_interval"),
                               ({"cache_interval": 2}, export, "cache_branch"),
                               ({"cache_interval": 2}, none, "cache_interval")):
        with pytest.raises(RequestError) as caught:
            validate({"prompt": "a cat", **body}, where)
        assert caught.value.param == param, caught.value.message


def test_torch_fast_path_runs_the_cached_loop(tiny_model_dir, tiny_pipeline):
    """channels_last through FastPath.denoise_cached equals the reference cached loop; the whole-loop graph cache
    captures the alternating loop (CPU stand-in for the CUDA capture; the capture itself is unverified on a GPU)."""
    from sdengine.backends import load_backend
    from sdengine.backends.torch_fast import LoopGraphs, LoopInputs, run_cached_loop
    from sdengine.models.step import CachedStep
    from sdengine.pipeline import Pipeline
    from sdengine.samplers import build_schedule

    fast = Pipeline(load_backend(tiny_model_dir, "torch", channels_last=True))
    assert np.abs(ours(fast, "ddim", 3, 4) - ours(tiny_pipeline, "ddim", 3, 4)).max() <= 1  # NHWC sums: rounding
    cache, backend = StepCache(2, 1), tiny_pipeline.backend
    split = cache_split(backend.config.unet, cache.branch)
    full, shallow = (CachedStep(backend.components.unet, split, s) for s in (False, True))
    captured = []

    def stand_in(fn):  # 'replay' reruns fn over the static buffers into the same output buffer
        out = fn()
        captured.append(out)
        return (lambda: out.copy_(fn())), out, (lambda: None)

    graphs = LoopGraphs(full, capture=stand_in, loop=lambda s: run_cached_loop(full, shallow, s, cache))
    schedule = build_schedule(backend.config.scheduler, "ddim", 5)
    with torch.inference_mode():
        ctx = backend.encode_text(backend.tokenizer(["", "a square"]))
        inputs = LoopInputs(torch.from_numpy(_latents()[None]), ctx,
                            torch.from_numpy(schedule.timesteps.astype(np.float32)),
                            torch.from_numpy(schedule.coefficients), torch.tensor(7.5))
        want = run_cached_loop(full, shallow, inputs, cache)
        assert torch.equal(graphs.run(inputs), want) and graphs.captures == 1 and len(captured) == 1


def test_sdxl_matches_deepcache_helper(tiny_sdxl_dir, tiny_sdxl_pipeline):
    """SDXL (no attention at the top level, two transformer layers below, text_time): DeepCacheSDHelper on diffusers'
    StableDiffusionXLPipeline, DDIM, interval 2, branch 3, within 2/255."""
    deepcache = pytest.importorskip("DeepCache")
    ref = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    helper = deepcache.DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=2, cache_branch_id=3)
    helper.enable()
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=7.5)
    try:
        out = ref(PROMPT, latents=torch.from_numpy(_latents()), output_type="np", **kwargs)
    finally:
        helper.disable()
    expected = out.images
    got = tiny_sdxl_pipeline(PROMPT, latents=_latents(), cache_interval=2, cache_branch=3, output_type="np",
                             **kwargs).images
    plain = tiny_sdxl_pipeline(PROMPT, latents=_latents(), output_type="np", **kwargs).images
    diff, levels = np.abs(got - expected).max(), np.abs(to_levels(got) - to_levels(expected)).max()
    print(f"\nparity step cache SDXL interval 2 branch 3 vs DeepCacheSDHelper: max {levels}/255, {diff:.1e} in float")
    assert to_levels(expected).std() > 5 and np.abs(plain - expected).max() > 10 * FLOAT_TOL
    assert levels <= MAX_PIXEL_DIFF and diff < FLOAT_TOL


def test_export_keeps_inputs_no_node_reads():
    """A shallow branch without cross-attention (SDXL's, the demo model's at branch 0) never reads the text: the
    exporter drops that input, and the export gives it back in the spec's place so every step graph binds alike."""
    onnx = pytest.importorskip("onnx")
    from sdengine.export.onnx_io import keep_unused_inputs
    from sdengine.specs import GraphSpec, TensorSpec

    spec = GraphSpec("g", "unet", inputs=(TensorSpec("a", "float32", (2,)), TensorSpec("text", "float32", (3,)),
                                          TensorSpec("c", "float32", (2,))),
                     outputs=(TensorSpec("y", "float32", (2,)),), doc="")
    h = onnx.helper
    graph = h.make_graph([h.make_node("Add", ["a", "c"], ["y"])], "g",
                         [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2]) for n in ("a", "c")],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    model = h.make_model(graph)
    keep_unused_inputs(model, spec)
    assert [v.name for v in model.graph.input] == ["a", "text", "c"]
    onnx.checker.check_model(model)
