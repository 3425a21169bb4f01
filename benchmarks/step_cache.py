"""Step caching (DeepCache) on the embedded demo model: seconds per image and distance to the uncached image
at each cache_interval, on the torch and ONNX Runtime backends; optionally the checker's accuracy over the 54
colour x shape x background prompts.

    python benchmarks/step_cache.py [--threads 1] [--steps 20] [--repeats 5] [--intervals 1 2 3 5]
                                    [--branch 0] [--backends torch onnxruntime] [--export DIR] [--checker]

The ONNX Runtime side runs an export of the demo model with --step-cache BRANCH (made in DIR if absent).
Intervals are interleaved within each repeat, so drift and contention spread over all of them; the figure per
interval is the median over repeats (seconds per one-image call, end to end: prompt to uint8 image).
Prints one JSON line per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a red circle on a white background"


def semantic_accuracy(pipe, steps: int, interval: int) -> dict[str, float]:
    """tests/test_demo.py's 54 prompts (20 DDIM steps, guidance 5, the same seeds), with step caching."""
    from sdengine.demo import checker, shapes

    rows = [(f"a {c} {s} on a {b} background", c, s, b)
            for c in shapes.COLOURS for s in shapes.SHAPES for b in shapes.BACKGROUNDS]
    verdicts = []
    for start in range(0, len(rows), 18):
        chunk = rows[start:start + 18]
        result = pipe([p for p, *_ in chunk], num_inference_steps=steps, guidance_scale=5.0, seed=900_000 + start,
                      cache_interval=interval)
        verdicts += [checker.check(im) for im in result.images]
    wanted = [r[1:] for r in rows]
    return {name: float(np.mean([getattr(v, name) == w[k] for v, w in zip(verdicts, wanted)]))
            for k, name in enumerate(("colour", "shape", "background"))}


def load(backend: str, threads: int, branch: int, export: Path):
    import sdengine

    if backend == "torch":
        return sdengine.load_pipeline(threads=threads)
    if not (export / "manifest.json").is_file():
        from sdengine.demo import embedded_model_path
        from sdengine.export import ExportSettings, export_model

        export_model(embedded_model_path(), export, ExportSettings(step_cache=branch), log=lambda line: None)
    return sdengine.load_pipeline(str(export), backend="onnxruntime", threads=threads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--branch", type=int, default=0)
    p.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    p.add_argument("--export", default=None, help="the demo model's export with --step-cache (default: a temp dir)")
    p.add_argument("--checker", action="store_true", help="also the checker's accuracy over the 54 prompts")
    args = p.parse_args()
    tmp = tempfile.TemporaryDirectory()
    export = Path(args.export or Path(tmp.name) / "demo-onnx")
    summary = []
    for backend in args.backends:
        pipe = load(backend, args.threads, args.branch, export)
        for n in args.intervals:  # warm-up: first-call allocations, the cached graphs' sessions
            pipe(PROMPT, num_inference_steps=args.steps, seed=0, cache_interval=n,
                 cache_branch=args.branch if n > 1 else None)
        times: dict[int, list[float]] = {n: [] for n in args.intervals}
        dist: dict[int, list[tuple[float, float]]] = {n: [] for n in args.intervals}
        for r in range(args.repeats):
            plain = None
            for n in args.intervals:
                start = time.perf_counter()
                out = pipe(PROMPT, num_inference_steps=args.steps, seed=r, cache_interval=n,
                           cache_branch=args.branch if n > 1 else None)
                times[n].append(time.perf_counter() - start)
                image = np.asarray(out.images[0]).astype(np.float64)
                if n == 1:
                    plain = image
                if plain is not None:
                    d = np.abs(image - plain)
                    dist[n].append((float(d.mean()), float(d.max())))
                print(json.dumps({"backend": backend, "interval": n, "seed": r, "seconds": round(times[n][-1], 4)}),
                      flush=True)
        for n in args.intervals:
            row = {"backend": backend, "interval": n, "branch": args.branch, "steps": args.steps,
                   "threads": args.threads, "median_s": round(statistics.median(times[n]), 4),
                   "min_s": round(min(times[n]), 4),
                   "mean_abs_diff_255": round(float(np.mean([m for m, _ in dist[n]])), 3) if dist[n] else None,
                   "max_abs_diff_255": max(mx for _, mx in dist[n]) if dist[n] else None}
            if args.checker:
                row["checker_54"] = semantic_accuracy(pipe, args.steps, n)
            print(json.dumps(row), flush=True)
            summary.append(row)
    print("\nbackend      interval  median s  speed-up  mean |diff| /255  max |diff| /255" +
          ("  checker (colour, shape, background)" if args.checker else ""))
    for row in summary:
        base = next(s["median_s"] for s in summary if s["backend"] == row["backend"] and s["interval"] == 1) \
            if 1 in args.intervals else row["median_s"]
        line = (f"{row['backend']:<12} {row['interval']:>8}  {row['median_s']:>8.3f}  {base / row['median_s']:>7.2f}x"
                f"  {row['mean_abs_diff_255']!s:>16}  {row['max_abs_diff_255']!s:>15}")
        if args.checker:
            c = row["checker_54"]
            line += f"  {c['colour']:.0%}, {c['shape']:.0%}, {c['background']:.0%}"
        print(line)
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
