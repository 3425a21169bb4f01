"""Per-step cost of exported denoise-step graphs against each other: one process, calls interleaved.

    python benchmarks/step_graph_ab.py LABEL=EXPORT_DIR [LABEL=EXPORT_DIR ...] [--runs 300] [--threads 1]

Each folder's denoise_step.onnx gets its own ONNX Runtime session (CPU, `--threads` intra-op threads) and
random inputs of the shapes it declares (batch 1, two embedding rows, the export's latent size or
`--latent`); the calls then alternate A B C A B C ... so that load on a shared machine falls on every graph
alike. Printed per graph: median and minimum milliseconds, and each median against the first graph's.
Used to compare issue 12's state-slot step (any sampler) with the DDIM-only step of an older export, which
`sdengine bench` can no longer load (its graph names differ).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def feeds(session, latent: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random float32 inputs of the declared shapes; named dims: batch 1, batch_x2 2, context 77 (one prompt
    chunk), latent sides `latent`."""
    named = {"batch": 1, "batch_x2": 2, "context": 77, "latent_height": latent, "latent_width": latent}
    out = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else named[d] for d in i.shape]
        value = rng.standard_normal(shape).astype(np.float32)
        if i.name == "timestep":
            value[:] = 500.0
        elif i.name == "guidance_scale":
            value[:] = 7.5
        elif i.name in ("mask", "blend"):
            value[:] = 0.0  # text to image: no blend
        out[i.name] = value
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", metavar="LABEL=EXPORT_DIR")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latent", type=int, default=None, help="latent side (default: from the export's manifest)")
    args = p.parse_args()
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    rng = np.random.default_rng(0)
    sessions, inputs = {}, {}
    for item in args.exports:
        label, _, folder = item.partition("=")
        with open(f"{folder}/manifest.json") as f:
            manifest = json.load(f)
        cfg = manifest["model_config"]
        latent = args.latent or cfg["vae"]["sample_size"] // 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
        sessions[label] = ort.InferenceSession(f"{folder}/denoise_step.onnx", opts, providers=["CPUExecutionProvider"])
        inputs[label] = feeds(sessions[label], latent, rng)
    for label, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, inputs[label])
    times: dict[str, list[float]] = {label: [] for label in sessions}
    for _ in range(args.runs):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs[label])
            times[label].append(1000 * (time.perf_counter() - start))
    first = statistics.median(next(iter(times.values())))
    print(json.dumps({"runs": args.runs, "threads": args.threads, "onnxruntime": ort.__version__, "graphs": {
        label: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3),
                "median_vs_first": round(statistics.median(v) / first, 4)} for label, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
