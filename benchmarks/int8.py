"""int8 (`sdengine export --int8`) against fp32 on the CPU: speed beside quality, in two parts.

    python benchmarks/int8.py demo --work DIR [--threads 1] [--repeats 7] [--ops matmul matmul+conv]
    python benchmarks/int8.py qdq --work DIR [--threads 1] [--repeats 7] [--calibration 16]
    flock /tmp/sdengine-bigmem.lock python benchmarks/int8.py step --model /tmp/sd15-random --work DIR \
        [--threads 1] [--repeats 5] [--ops matmul matmul+conv]

`demo`: the embedded demo model exported at fp32 and with `--int8 OPS` (into DIR, reused when present). Time per
image (one image, 20 DDIM steps, guidance 5, end to end: prompt to uint8 image), the subjects interleaved within
each repeat, median over repeats; then the 54 colour x shape x background prompts of sampler_quality.py's
checker (seed 100_000 + i, 20 DDIM steps, guidance 5) through each subject: the checker's accuracy (all three
right) and the per-pixel distance of each int8 image to the fp32 image of the same prompt and seed (/255: the
mean over all pixels of all images, and the largest).

`step`: the denoise step graph alone (U-Net + guidance + sampler update) of the model at --model, exported
static at 128x128, one image (a 16x16 latent, CFG batch 2) at fp32 and with `--int8 OPS` (the step graph only,
through sdengine.export.export_model, into DIR). Seconds per step through ONNX Runtime sessions at --threads
threads, the subjects interleaved per repeat, on one fixed random input (sdengine.specs.sample_inputs); the
relative L2 of each int8 output to fp32's; the graph's size on disk; the session's load time.

`qdq` (after `demo`, same --work): the demo's step graph alone, fp32 and the two dynamic int8 graphs against a
static QDQ quantization (see its docstring), seconds per step call, interleaved.

Prints one JSON line per measurement and a JSON summary (`--json FILE` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from itertools import product
from pathlib import Path

import numpy as np

PROMPT = "a red circle on a white background"


def _export(model: Path, out: Path, int8: str | None, **settings) -> Path:
    from sdengine.export import ExportSettings, export_model

    if not (out / "manifest.json").is_file():
        start = time.perf_counter()
        export_model(model, out, ExportSettings(int8=int8, **settings), log=lambda line: None)
        print(json.dumps({"exported": out.name, "int8": int8, "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
    return out


def _paired(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over repeats of each subject's time over fp32's in the same repeat (drift cancels within a repeat)."""
    return {n: round(statistics.median(x / f for x, f in zip(t, times["fp32"])), 3) for n, t in times.items()}


def _subjects(ops: list[str]) -> list[tuple[str, str | None]]:
    return [("fp32", None)] + [(f"int8 {o}", o) for o in ops]


def demo(args: argparse.Namespace) -> dict:
    import sdengine
    from sdengine.demo import checker as check
    from sdengine.demo import embedded_model_path
    from sdengine.demo.shapes import BACKGROUNDS, COLOURS, SHAPES

    pipes = {}
    for name, ops in _subjects(args.ops):
        folder = _export(embedded_model_path(), args.work / f"demo-{name.replace(' ', '-')}", ops)
        pipes[name] = sdengine.load_pipeline(str(folder), backend="onnxruntime", threads=args.threads)

    def one(pipe, prompt: str, seed: int):
        return pipe(prompt, num_inference_steps=20, guidance_scale=5.0, seed=seed, scheduler="ddim").images[0]

    for pipe in pipes.values():  # warm-up
        one(pipe, PROMPT, 0)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for r in range(args.repeats):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            one(pipe, PROMPT, r)
            times[name].append(time.perf_counter() - start)
    out: dict = {"threads": args.threads, "repeats": args.repeats, "load_average": os.getloadavg(),
                 "seconds_per_image": {n: round(statistics.median(t), 4) for n, t in times.items()},
                 "seconds_all": {n: [round(x, 4) for x in t] for n, t in times.items()}}
    out["ratio_to_fp32"] = {n: round(s / out["seconds_per_image"]["fp32"], 3)
                            for n, s in out["seconds_per_image"].items()}
    out["paired_ratio_to_fp32"] = _paired(times)
    print(json.dumps({"timing": out}), flush=True)

    cases = list(product(COLOURS, SHAPES, BACKGROUNDS))
    right = {name: 0 for name in pipes}
    diffs: dict[str, list[np.ndarray]] = {name: [] for name in pipes if name != "fp32"}
    for i, (colour, shape, background) in enumerate(cases):
        images = {name: one(pipe, f"a {colour} {shape} on a {background} background", 100_000 + i)
                  for name, pipe in pipes.items()}
        ref = np.asarray(images["fp32"], dtype=np.int16)
        for name, image in images.items():
            v = check.check(image)
            right[name] += (v.colour, v.shape, v.background) == (colour, shape, background)
            if name != "fp32":
                diffs[name].append(np.abs(np.asarray(image, dtype=np.int16) - ref))
    out["checker_all_three_right"] = {name: f"{right[name]}/{len(cases)}" for name in pipes}
    out["distance_to_fp32_per_pixel_255"] = {
        name: {"mean": round(float(np.mean(d)), 3), "max": int(np.max(d)),
               "images_mean_over_2": int(sum(float(np.mean(x)) > 2 for x in d))} for name, d in diffs.items()}
    out["load_average_end"] = os.getloadavg()
    return out


def step(args: argparse.Namespace) -> dict:
    import onnxruntime as ort

    from sdengine.manifest import Manifest
    from sdengine.specs import DENOISE_STEP, sample_inputs, spec_of, validation_points

    sessions, sizes, loads, manifest = {}, {}, {}, None
    for name, ops in _subjects(args.ops):
        folder = _export(args.model, args.work / f"step-{name.replace(' ', '-')}", ops, static=True, batch=(1,),
                         height=(args.size,), width=(args.size,), graphs=(DENOISE_STEP,))
        manifest = Manifest.read(folder)
        path = manifest.graph_path(DENOISE_STEP)
        sizes[name] = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith(path.name))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        start = time.perf_counter()
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        loads[name] = round(time.perf_counter() - start, 2)
    spec = spec_of(DENOISE_STEP, manifest.config)
    dims = validation_points(manifest.config, manifest.ranges)[0]
    inputs = sample_inputs(spec, manifest.config, dims, np.random.default_rng(0))
    outputs = {name: s.run(spec.output_names, inputs)[0] for name, s in sessions.items()}  # also the warm-up
    ref = outputs["fp32"].astype(np.float64)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(spec.output_names, inputs)
            times[name].append(time.perf_counter() - start)
    med = {n: round(statistics.median(t), 4) for n, t in times.items()}
    return {"threads": args.threads, "repeats": args.repeats, "dims": dims, "load_average": os.getloadavg(),
            "seconds_per_step": med, "seconds_all": {n: [round(x, 4) for x in t] for n, t in times.items()},
            "ratio_to_fp32": {n: round(s / med["fp32"], 3) for n, s in med.items()},
            "paired_ratio_to_fp32": _paired(times),
            "rel_l2_to_fp32": {n: float(np.linalg.norm(o.astype(np.float64) - ref) / np.linalg.norm(ref))
                               for n, o in outputs.items() if n != "fp32"},
            "graph_bytes": sizes, "session_load_s": loads}


def qdq(args: argparse.Namespace) -> dict:
    """The demo's step graph alone: fp32, the two dynamic int8 graphs (from `demo`'s folders in --work) and a
    static QDQ graph (QLinearConv-capable: MatMul and Conv, per-channel int8 weights, uint8 activations calibrated
    with MinMax on --calibration random step inputs drawn like the export's validation inputs). Not a flag yet."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from sdengine.export.int8 import quantized_ops
    from sdengine.manifest import Manifest
    from sdengine.specs import DENOISE_STEP, sample_inputs, spec_of, validation_points

    manifest = Manifest.read(args.work / "demo-fp32")
    spec = spec_of(DENOISE_STEP, manifest.config)
    dims = validation_points(manifest.config, manifest.ranges)[0]
    rng = np.random.default_rng(1)
    calibration = [sample_inputs(spec, manifest.config, dims, rng) for _ in range(args.calibration)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            return next(self.items, None)

    paths = {"fp32": manifest.graph_path(DENOISE_STEP)}
    for ops in ("matmul", "matmul+conv"):
        paths[f"int8 {ops} (dynamic)"] = Manifest.read(args.work / f"demo-int8-{ops}").graph_path(DENOISE_STEP)
    static = args.work / "qdq" / "denoise_step.onnx"
    static.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    quantize_static(paths["fp32"], static, Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv"], per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    quantize_s = round(time.perf_counter() - start, 1)
    paths["int8 matmul+conv (static QDQ)"] = static
    sessions = {}
    for name, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = sample_inputs(spec, manifest.config, dims, np.random.default_rng(0))  # not a calibration sample
    outputs = {name: s.run(spec.output_names, inputs)[0] for name, s in sessions.items()}
    ref = outputs["fp32"].astype(np.float64)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            for _ in range(10):
                s.run(spec.output_names, inputs)
            times[name].append((time.perf_counter() - start) / 10)
    med = {n: round(statistics.median(t), 5) for n, t in times.items()}
    return {"threads": args.threads, "repeats": args.repeats, "dims": dims, "load_average": os.getloadavg(),
            "calibration_samples": args.calibration, "static_quantize_s": quantize_s, "seconds_per_step": med,
            "ratio_to_fp32": {n: round(s / med["fp32"], 3) for n, s in med.items()},
            "paired_ratio_to_fp32": _paired(times),
            "rel_l2_to_fp32": {n: float(np.linalg.norm(o.astype(np.float64) - ref) / np.linalg.norm(ref))
                               for n, o in outputs.items() if n != "fp32"},
            "integer_ops": {n: quantized_ops(p) for n, p in paths.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("demo", "step", "qdq"))
    p.add_argument("--work", type=Path, required=True, help="export folders are made here (and reused)")
    p.add_argument("--model", type=Path, help="step: a diffusers folder (e.g. SD 1.5-shaped random weights)")
    p.add_argument("--size", type=int, default=128, help="step: image side in pixels (default 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--ops", nargs="+", default=["matmul", "matmul+conv"])
    p.add_argument("--calibration", type=int, default=16, help="qdq: calibration samples")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.part == "step" and args.model is None:
        p.error("step needs --model")
    args.work.mkdir(parents=True, exist_ok=True)
    result = {"part": args.part, "argv": os.sys.argv[1:], **{"demo": demo, "step": step, "qdq": qdq}[args.part](args)}
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
