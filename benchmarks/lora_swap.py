"""LoRA set changes and generation with LoRAs, torch and ONNX Runtime, on the embedded demo model (CPU).

    python benchmarks/lora_swap.py --onnx EXPORT_DIR [--onnx16 FP16_EXPORT_DIR] [--runs 5] [--threads 1]

Writes two random kohya LoRAs over the demo model's U-Net (attention, feed-forward, 3x3 and 1x1 convolutions)
and text encoder, then prints per backend the median seconds of set_loras for A, B, A+B and {} and of a
20-step 64x64 generation without and with A+B (merged weights: the two should cost the same). Calls
alternate so that load on a shared machine falls on every case alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import sdengine  # noqa: E402
from lora_support import low_rank, write_kohya  # noqa: E402


def lora_files(pipe, folder: Path) -> tuple[Path, Path]:
    targets = pipe.backend.lora_targets()
    unet = tuple(n[5:-7] for n, s in targets.items() if n.startswith("unet.") and len(s) >= 2 and n.endswith(".weight")
                 and any(k in n for k in ("to_q", "to_v", "ff.net", "conv1", "conv_shortcut", "proj_in")))
    text = tuple(n[13:-7] for n, s in targets.items() if n.startswith("text_encoder.") and len(s) >= 2
                 and "_proj.weight" in n)
    modules = {"unet": unet, "text_encoder": text}
    return (write_kohya(folder / "a.safetensors", low_rank(targets, modules, 8, 1, 0.05), 8.0),
            write_kohya(folder / "b.safetensors", low_rank(targets, modules, 8, 2, 0.05), 8.0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--onnx16", default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    pipes = {"torch": sdengine.load_pipeline(threads=args.threads),
             "onnxruntime": sdengine.load_pipeline(args.onnx, backend="onnxruntime", threads=args.threads)}
    if args.onnx16:
        pipes["onnxruntime fp16"] = sdengine.load_pipeline(args.onnx16, backend="onnxruntime", threads=args.threads)
    folder = Path(tempfile.mkdtemp())
    a, b = lora_files(pipes["torch"], folder)
    sets = {"A": {a: 0.8}, "B": {b: 0.6}, "A+B": {a: 0.8, b: 0.6}, "{}": {}}
    print(f"{len(pipes['torch'].backend.lora_targets())} weights in the model; each LoRA touches "
          f"{len(sdengine.lora.read_lora(a, pipes['torch'].backend.lora_targets()).pairs)}")
    swap = {(name, s): [] for name in pipes for s in sets}
    gen = {(name, w): [] for name in pipes for w in ("without", "with A+B")}
    for _ in range(args.runs):
        for name, pipe in pipes.items():
            for label, loras in sets.items():
                swap[(name, label)].append(pipe.set_loras(loras))
            for label, loras in (("without", {}), ("with A+B", sets["A+B"])):
                pipe.set_loras(loras)
                start = time.perf_counter()
                pipe("a red circle on a white background", num_inference_steps=20, seed=1)
                gen[(name, label)].append(time.perf_counter() - start)
            pipe.set_loras({})
    for name in pipes:
        cells = ", ".join(f"{s} {statistics.median(swap[(name, s)]) * 1e3:.0f} ms" for s in sets)
        gens = ", ".join(f"{w} {statistics.median(gen[(name, w)]):.3f} s" for w in ("without", "with A+B"))
        print(f"{name}: set_loras median {cells}; 20-step generation median {gens}")


if __name__ == "__main__":
    main()
