#!/usr/bin/env python3
"""benchmarks/results-gpu.json from what benchmarks/gpu_check.py and gpu_fastpath.py wrote (issue 17).

    python benchmarks/gpu_results.py --check DIR --fast DIR [--fast DIR2] --out FILE [--final]

Reads gpu_check's <part>.json files and gpu_fastpath's results.jsonl, whatever exists so far (gpu_session.sh
calls it every snapshot, so a run killed part-way still leaves a file), and writes FILE (temporary name, then
renamed) with exactly these fields:

  device, driver, torch, cuda_bindings
  graph_replay_equal          {tiny, sd15_shaped}: the replayed whole-loop graph equals the uncaptured loop
                              (tiny: every case bit-identical, new inputs too; SD 1.5-shaped: gpu_check's sd15)
  fp16_vs_fp32_max_diff_255   worst max pixel difference, CUDA fp16 vs CPU fp32 reference, tiny model
  fp16_vs_fp32_within_2_255   that figure <= 2
  runtime_no_leak             gpu_check's buffers part: its checks passed, nothing live after close, and
                              cudaMemGetInfo within 2 MiB of before, after a warm-up round (bytes: leaked_bytes)
  unet_step_ms                {eager, whole_loop_graph, compiled_graph}: one SD 1.5 denoise step (U-Net on 2
                              rows for guidance 7.5 + update), 512x512; eager and whole_loop_graph from
                              gpu_check's sd15 (CUDA events), compiled_graph = ours-compiled's denoise stage / steps
  e2e_s                       {ours_fastest, diffusers_compiled, diffusers_eager}: median seconds of one image,
                              50 DDIM steps, 512x512, guidance 7.5, prompt to uint8 image
  images_per_s                {ours: {batch: v}, diffusers_compiled: {batch: v}} for batches 1, 2, 4, 8
  configs                     what each e2e row compiled and captured, as the row recorded it
  reasons                     {field: why it is null}, for every null above
  partial                     true until gpu_session.sh's final call (--final)

Nothing here needs torch or a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

BATCHES = (1, 2, 4, 8)
STEPS = 50


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a killed child
            continue
    return rows


def _why(part: dict | None, name: str) -> str:
    if part is None:
        return f"gpu_check's {name} part wrote no result (not run, or the run was cut before it)"
    return part.get("skipped") or part.get("error") or f"gpu_check's {name} part did not measure it"


def collect(check: Path, fast: Path | list[Path], final: bool = False) -> dict[str, Any]:
    """The results from gpu_check's folder and one or more gpu_fastpath folders (a follow-up run's too)."""
    env, buffers, tiny, sd15 = (_json(check / f"{n}.json") for n in ("env", "buffers", "tiny", "sd15"))
    rows = [row for folder in ([fast] if isinstance(fast, Path) else fast) for row in _rows(folder / "results.jsonl")]
    fenv = next((r for r in rows if r.get("kind") == "env"), {})
    reasons: dict[str, str] = {}
    r: dict[str, Any] = {}

    def put(field: str, value: Any, reason: str) -> None:
        r[field] = value
        if value is None:
            reasons[field] = reason

    smi = (check / "nvidia-smi.txt")
    smi_text = smi.read_text().strip() if smi.exists() else ""
    put("device", (env or {}).get("gpu") or fenv.get("gpu"), "neither script reached the GPU")
    driver = fenv.get("driver") or (smi_text.split(",")[1].strip() if smi_text.count(",") >= 2 else None)
    put("driver", driver, "nvidia-smi gave no driver version")
    put("torch", (env or {}).get("torch") or fenv.get("torch"), "no script reported torch's version")
    put("cuda_bindings", ((env or {}).get("modules") or {}).get("cuda.bindings"), _why(env, "env"))

    replay: dict[str, Any] = {"tiny": None, "sd15_shaped": None}
    if tiny and tiny.get("cases"):
        replay["tiny"] = all(c["graph_vs_eager"]["identical"] and c["cached_graph_new_inputs_vs_eager"]["identical"]
                             for c in tiny["cases"])
    else:
        reasons["graph_replay_equal.tiny"] = _why(tiny, "tiny")
    if sd15 and "graph_vs_eager" in sd15:
        replay["sd15_shaped"] = bool(sd15["graph_vs_eager"]["identical"])
    else:
        reasons["graph_replay_equal.sd15_shaped"] = _why(sd15, "sd15")
    r["graph_replay_equal"] = replay

    worst = max((c["image_vs_cpu_fp32"]["max_255"] for c in (tiny or {}).get("cases", [])), default=None)
    put("fp16_vs_fp32_max_diff_255", worst, _why(tiny, "tiny"))
    r["fp16_vs_fp32_within_2_255"] = None if worst is None else worst <= 2
    if buffers and "leaked_bytes" in buffers:
        r["runtime_no_leak"] = bool(buffers.get("ok"))
        r["leaked_bytes"] = buffers["leaked_bytes"]
    else:
        put("runtime_no_leak", None, _why(buffers, "buffers"))

    steps = fenv.get("steps") or STEPS
    stage = next((x for x in rows if x.get("kind") == "stages" and x.get("variant") == "ours-compiled"), None)
    r["unet_step_ms"] = {"eager": (sd15 or {}).get("eager_step_ms_median"),
                         "whole_loop_graph": (sd15 or {}).get("graph_step_ms"),
                         "compiled_graph": None if stage is None else round(stage["denoise_s"] * 1e3 / steps, 3)}
    for key in ("eager", "whole_loop_graph"):
        if r["unet_step_ms"][key] is None:
            reasons[f"unet_step_ms.{key}"] = _why(sd15, "sd15")
    if stage is None:
        reasons["unet_step_ms.compiled_graph"] = _fast_reason(rows, "ours-compiled")

    timings = [x for x in rows if x.get("kind") == "timing"]
    one = {x["variant"]: x for x in timings if x.get("batch") == 1}
    ours = [x for name, x in one.items() if name.startswith("ours")]
    best = min(ours, key=lambda x: x["median_s"], default=None)
    r["e2e_s"] = {"ours_fastest": None if best is None else best["median_s"],
                  "diffusers_compiled": one.get("diffusers-compiled", {}).get("median_s"),
                  "diffusers_eager": one.get("diffusers-eager", {}).get("median_s")}
    r["e2e_variant"] = {"ours_fastest": None if best is None else best["variant"]}
    for key, variant in (("ours_fastest", "ours-compiled"), ("diffusers_compiled", "diffusers-compiled"),
                         ("diffusers_eager", "diffusers-eager")):
        if r["e2e_s"][key] is None:
            reasons[f"e2e_s.{key}"] = _fast_reason(rows, variant)
    r["images_per_s"] = {side: {str(b): next((x["images_per_s"] for x in timings if x["variant"] == variant
                                             and x.get("batch") == b), None) for b in BATCHES}
                         for side, variant in (("ours", "ours-compiled"), ("diffusers_compiled", "diffusers-compiled"))}
    for side, values in r["images_per_s"].items():
        for b, v in values.items():
            if v is None:
                reasons[f"images_per_s.{side}.{b}"] = _fast_reason(rows, "ours-compiled" if side == "ours"
                                                                   else "diffusers-compiled", int(b))
    r["configs"] = {name: x.get("config") for name, x in one.items()}
    r["setting"] = {"steps": steps, "sampler": "ddim, eta 0", "size": "512x512", "guidance": 7.5,
                    "weights": "random SD 1.5-shaped, fp16 (the same folder for ours and diffusers)"}
    r["reasons"] = reasons
    r["partial"] = not final
    r["written"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return r


def _fast_reason(rows: list[dict], variant: str, batch: int = 1) -> str:
    """Why gpu_fastpath has no timing for `variant` at `batch`: its skip, error or time-out, as recorded."""
    part = "throughput" if batch != 1 else variant
    for x in reversed(rows):
        if x.get("part") in (part, variant) or x.get("variant") == variant:
            if x.get("kind") == "skipped" and x.get("batch", batch) == batch:
                return f"{part}: skipped: {x.get('reason')}"
            if x.get("kind") == "error" and x.get("batch", batch) == batch:
                return f"{part}: error: {x.get('error')}"
            if x.get("kind") == "part-end" and x.get("part") == part and x.get("rc") != 0:
                return f"{part}: ended with {x.get('rc')} after {x.get('wall_s')} s (limit {x.get('slot_s')} s)"
    if batch != 1:
        return "the throughput part is not in this run's plan (gpu_session.sh ONLY=followup runs it)"
    return f"{variant} has not run (not in the plan, or the run was cut before it)"


def write(data: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", type=Path, required=True, help="gpu_check.py's --out folder")
    p.add_argument("--fast", type=Path, action="append", required=True,
                   help="gpu_fastpath.py's --out folder (repeat for a follow-up run's)")
    p.add_argument("--out", type=Path, required=True, help="the results-gpu.json to write")
    p.add_argument("--final", action="store_true", help="the session ended: partial becomes false")
    args = p.parse_args(argv)
    write(collect(args.check, args.fast, args.final), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
