#!/usr/bin/env python3
"""GPU fast path against diffusers, end to end on the same random SD 1.5-shaped fp16 weights (issue 6).

    python benchmarks/gpu_fastpath.py --out DIR [--budget-s 440] [--parts LIST] [--work DIR] [--steps 50]
                                      [--runs 10] [--compile-mode default] [--quick]

One image, 512x512, 50 DDIM steps (eta 0), guidance 7.5, text encoder + loop + VAE decode, timed between
CUDA syncs; median (and p95) of up to --runs runs after a first, separately reported call (compile,
capture). Parts, in this order, each in its own child process (its own process group, killed with the
parent: benchmarks/procs.py) with a hard time limit carved from --budget-s; the parts that will run
(the diffusers ones only where diffusers is importable) are promised RESERVE_S by the parts before them:

  prepare             random SD 1.5-shaped weights built on the GPU in fp16, saved as a diffusers folder
                      (the one set of weights both sides load), versions and the GPU
  diffusers-eager     StableDiffusionPipeline as loaded (NCHW, no compile; its DDIMScheduler from the same
                      config), our initial latents
  ours-compiled       channels_last + torch.compile (--compile-mode) of the denoise step (U-Net, guidance,
                      sampler update) and of the VAE decoder + the whole-loop CUDA graph
  diffusers-compiled  diffusers' own speed guide (gpu_fastpath_parts.compile_diffusers says what is done and
                      what is left out, and each row records it): fused QKV projections, channels_last U-Net
                      and VAE, torch.compile(mode="reduce-overhead", fullgraph=True) of the U-Net and of
                      vae.decode (inductor kernels replayed as CUDA graphs), the guide's inductor settings
  ours-graph          the reference eager loop, the whole-loop CUDA graph, the same with channels_last;
                      which fused attention kernels the U-Net and VAE run
  throughput          images/s at --batches (default 2 4 8; batch 1 is the rows above), ours compiled
                      against diffusers compiled, one shape after the other

ours-compiled and diffusers-compiled start together (--serial: one after the other): both compile at
once, then each waits until the other has compiled (or ended) and takes a lock on the GPU for its timed
runs, so no timing overlaps the other's work. The parts' estimated seconds (EST_S) size the plan in
benchmarks/gpu_session.sh.

Results, three files: DIR/results.jsonl (one JSON object per line, appended as each figure is measured:
kinds env, load, timing, compile, stages, sdpa, agreement, skipped, error, part-end), DIR/summary.json,
and DIR/children.log (every child's output, compiler warnings included, kept off the terminal).
Agreement rows compare final latents (relative L2) and uint8 images (max pixel difference) for one seed.

--quick: the tiny model, 5 steps, 3 runs: a smoke run of every part; without a GPU the CUDA graph rows
are recorded as skipped, and the compiled rows run on the CPU with dynamo alone (backend "eager": the
code path, not inductor's kernels), throughput at the first batch size only.

Needs: torch (CUDA build) with triton, transformers, safetensors, Pillow, regex, and diffusers for the
diffusers rows (without it those rows are skipped and said so). The children get the repository root on
PYTHONPATH, so sdengine need not be installed. Weights (about 2 GB) and compiler caches go to --work,
not to --out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procs  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("prepare", "diffusers-eager", "ours-compiled", "diffusers-compiled", "ours-graph", "throughput")
# Seconds each part is expected to take on an H200 (imports, loading, compile, capture and the timed runs). These are
# estimates, not readings: the U-Net's cold inductor compile was put at about 83 s on an H100 (issue 6), the VAE
# decoder's at a third of that. They size the plan in gpu_session.sh and the reserves below.
EST_S = {"prepare": 35, "diffusers-eager": 35, "ours-compiled": 170, "diffusers-compiled": 170, "ours-graph": 50,
         "throughput": 300}
CAP_S = {"prepare": 90, "diffusers-eager": 60, "ours-compiled": 230, "diffusers-compiled": 230, "ours-graph": 90,
         "throughput": 560}  # a part's most seconds
MIN_S = {"prepare": 20, "diffusers-eager": 25, "ours-compiled": 90, "diffusers-compiled": 90, "ours-graph": 30,
         "throughput": 60}  # fewer seconds left: the part is skipped
# Earlier parts leave these parts this much time, counted only for the parts that will run (diffusers importable).
RESERVE_S = {"diffusers-eager": 30, "diffusers-compiled": 100}
# Parts started together: both compile at once (inductor's compile is mostly host work), then take turns on the
# GPU for their timed runs (gpu_fastpath_parts.Part.gpu_turn), so no timing overlaps another part's work.
CONCURRENT = ("ours-compiled", "diffusers-compiled")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "max-autotune")
NEEDED = ("torch", "transformers", "safetensors", "PIL", "regex", "sdengine")
DIFFUSERS_PARTS = ("diffusers-eager", "diffusers-compiled")


# --- child side: one function per part (torch is imported only in the child processes) ----------------


def run_prepare(part) -> None:
    import torch

    import gpu_fastpath_parts as P

    part.record("env", quick=part.quick, steps=part.steps, side=part.side, **P.versions())
    if not part.cuda and not part.quick:
        raise SystemExit(f"{P.NO_GPU}; run with --quick for a CPU smoke run")
    if (part.folder / "model_index.json").exists():
        part.record("weights", folder=str(part.folder), reused=True)
        return
    from sdengine.models.saving import save_diffusers_folder
    from sdengine.models.text_encoder import TextEncoder
    from sdengine.models.unet import UNet
    from sdengine.models.vae import AutoencoderKL

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(part.device):  # initialised on the device: seconds, not minutes on the host
        parts = [m.to(part.dtype) for m in (UNet(part.config.unet), AutoencoderKL(part.config.vae),
                                            TextEncoder(part.config.text_encoder))]
    part.sync()
    built = time.perf_counter()
    save_diffusers_folder(part.folder, part.config, *parts, dtype=part.dtype, overwrite=True)
    part.record("weights", folder=str(part.folder), build_s=round(built - start, 2),
                save_s=round(time.perf_counter() - built, 2),
                parameters={n: sum(p.numel() for p in m.parameters()) for n, m in zip(("unet", "vae", "text"), parts)})


def run_ours_graph(part) -> None:
    from sdengine.backends.torch_backend import TorchBackend

    import gpu_fastpath_parts as P

    components = P.load_ours(part)
    variants = [("ours-eager", P.fast_options(), part.state["eager_runs"]),
                ("ours-graph", P.fast_options(cuda_graph=True), part.runs),
                ("ours-graph-cl", P.fast_options(channels_last=True, cuda_graph=True), part.runs)]
    for name, options, runs in variants:  # channels_last converts the modules in place: it comes last
        if options.cuda_graph and not part.cuda:
            part.record("skipped", variant=name, reason=P.NO_GPU)
            continue
        if part.left() < 20:
            part.record("skipped", variant=name, reason="part time limit reached")
            continue
        backend = TorchBackend(components, part.device, options)
        P.measure_ours(part, name, backend, runs)
        backend.close()
    if part.cuda and part.left() > 10:
        P.sdpa_check(part, components)


def run_diffusers_eager(part) -> None:
    import gpu_fastpath_parts as P

    P.measure_diffusers(part, "diffusers-eager", P.load_diffusers(part), part.runs)


def _ours_fastest(part, variant: str):
    """Our fastest path without TensorRT (channels_last + compile + whole-loop graph), or None: no GPU."""
    from sdengine.backends.torch_backend import TorchBackend

    import gpu_fastpath_parts as P

    if not part.cuda and not part.quick:
        part.record("skipped", variant=variant, reason=P.NO_GPU)
        return None
    options = P.fast_options(channels_last=True, compile_mode=part.state["compile_mode"], cuda_graph=part.cuda,
                             compile_backend=P.compile_backend(part))
    return TorchBackend(P.load_ours(part), part.device, options)


def run_ours_compiled(part) -> None:
    import gpu_fastpath_parts as P

    backend = _ours_fastest(part, "ours-compiled")
    if backend is None:
        return
    P.warm_compiled(part, "ours-compiled", backend)
    with part.gpu_turn():  # compiled next to diffusers-compiled: the timed runs wait for the GPU to be ours alone
        P.measure_ours(part, "ours-compiled", backend, part.runs)


def run_diffusers_compiled(part) -> None:
    import gpu_fastpath_parts as P

    if not part.cuda and not part.quick:
        part.record("skipped", variant="diffusers-compiled", reason=P.NO_GPU)
        return
    pipe = P.load_diffusers(part)
    how = P.compile_diffusers(pipe, fullgraph=True, backend=P.compile_backend(part))
    part.record("compile-start", variant="diffusers-compiled", **how)
    try:
        first = P.first_call(part, lambda: P.diffusers_call(part, pipe))
    except Exception as exc:  # a graph break under fullgraph: fall back to the default, and say so
        part.record("error", variant="diffusers-compiled", during="fullgraph compile", error=P.first_line(exc))
        pipe = P.load_diffusers(part)
        how = P.compile_diffusers(pipe, fullgraph=False, backend=P.compile_backend(part))
        part.record("compile-start", variant="diffusers-compiled", **how)
        first = P.first_call(part, lambda: P.diffusers_call(part, pipe))
    part.record("compile", variant="diffusers-compiled", first_call_s=first, cudagraph_counters=_cudagraph_counters())
    with part.gpu_turn():
        P.measure_diffusers(part, "diffusers-compiled", pipe, part.runs, config=how)


def _cudagraph_counters() -> dict:
    import torch._dynamo.utils as dynamo_utils

    return {k: v for k, v in dynamo_utils.counters["inductor"].items() if "cudagraph" in k}


def run_throughput(part) -> None:
    import gpu_fastpath_parts as P

    ours = _ours_fastest(part, "throughput")
    if ours is None:
        return
    sides = ("ours-compiled", "diffusers-compiled") if importlib.util.find_spec("diffusers") else ("ours-compiled",)
    how = None
    if len(sides) == 2:
        pipe = P.load_diffusers(part)
        how = P.compile_diffusers(pipe, fullgraph=True, backend=P.compile_backend(part))
    batches = part.state["batches"] if part.cuda else part.state["batches"][:1]  # CPU smoke run: one size
    for batch in batches:  # each new shape compiles again on both sides
        for name in sides:
            if part.left() < 30:
                part.record("skipped", variant=name, batch=batch, reason="part time limit reached")
                continue
            try:
                if name.startswith("ours"):
                    P.measure_ours(part, name, ours, part.state["throughput_runs"], batch=batch, keep=False)
                else:
                    P.measure_diffusers(part, name, pipe, part.state["throughput_runs"], batch=batch, keep=False,
                                        config=how)
            except Exception as exc:
                part.record("error", variant=name, batch=batch, error=P.first_line(exc))


RUNNERS = {"prepare": run_prepare, "ours-graph": run_ours_graph, "diffusers-eager": run_diffusers_eager,
           "ours-compiled": run_ours_compiled, "diffusers-compiled": run_diffusers_compiled,
           "throughput": run_throughput}


def child(name: str, state_path: Path, deadline: float) -> int:
    import gpu_fastpath_parts as P

    part = P.Part(name, json.loads(state_path.read_text()), deadline)
    try:
        RUNNERS[name](part)
    except SystemExit as exc:
        part.record("error", error=str(exc))
        return 3
    except Exception as exc:
        part.record("error", error=P.first_line(exc))
        raise
    return 0


# --- parent side: no torch, only processes, limits and the results file --------------------------------


def child_env(work: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               DIFFUSERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor-cache"), TRITON_CACHE_DIR=str(work / "triton-cache"))
    env.pop("TORCH_LOGS", None)
    return env


def run_child(cmd: list[str], log, env: dict, limit: float) -> int | str:
    """Run one part in its own process group; past `limit` seconds the group (compile workers too) is killed, and
    a killed parent kills it too (benchmarks/procs.py)."""
    return procs.wait(procs.start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), limit)


def append(results: Path, **fields) -> None:
    with results.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **fields}) + "\n")


def preflight(env: dict) -> tuple[list[str], bool]:
    """Modules missing for the children (found without importing them), and whether diffusers is there."""
    code = ("import importlib.util, json; print(json.dumps([m for m in %r + ('diffusers',) "
            "if importlib.util.find_spec(m) is None]))" % (NEEDED,))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    missing = json.loads(r.stdout) if r.returncode == 0 else ["(preflight failed: " + r.stderr.strip()[-200:] + ")"]
    return [m for m in missing if m != "diffusers"], "diffusers" not in missing


def runnable(parts: list[str], has_diffusers: bool) -> list[str]:
    """The parts that will run: the diffusers ones only where diffusers is importable."""
    return [p for p in parts if has_diffusers or p not in DIFFUSERS_PARTS]


def groups(parts: list[str], concurrent: bool = True) -> list[tuple[str, ...]]:
    """The parts in order, the CONCURRENT pair as one group where both run and `concurrent` is on."""
    out: list[tuple[str, ...]] = []
    for name in parts:
        if concurrent and out and name in CONCURRENT and all(p in CONCURRENT for p in out[-1]):
            out[-1] = out[-1] + (name,)
        else:
            out.append((name,))
    return out


def slot_for(group: tuple[str, ...], later: list[str], left: float, quick: bool) -> float:
    """A group's seconds: its cap, less what the later parts that will run are promised, never more than is left."""
    slot = min(max(CAP_S[n] for n in group) * (0.5 if quick else 1.0), left)
    reserve = sum(RESERVE_S.get(name, 0) for name in later)
    if reserve and not quick:
        slot = min(slot, max(left - reserve, max(MIN_S[n] for n in group)))
    return slot


def run_group(group: tuple[str, ...], args: argparse.Namespace, state_path: Path, results: Path, env: dict,
              slot: float) -> dict[str, int | str]:
    """Start every part of `group` at once (each its own process group, all with one deadline); their exit codes.
    A part that ends leaves sync/ended-<part>, so a peer waiting for its turn on the GPU stops waiting."""
    deadline, sync = time.time() + slot - 5, args.work / "sync"
    log_path = args.out / "children.log"
    running, rcs = {}, {}
    for name in group:  # marked before any starts, so the first to finish compiling waits for the others
        (sync / f"started-{name}").touch()
    with log_path.open("a") as log:
        for name in group:
            log.write(f"\n===== {name} (limit {slot:.0f} s{', with ' + ', '.join(group) if len(group) > 1 else ''})"
                      f" =====\n")
            log.flush()
            cmd = [sys.executable, __file__, "--child", name, "--state", str(state_path), "--deadline", str(deadline)]
            running[name] = procs.start(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        end = time.monotonic() + slot
        while running:
            for name, proc in list(running.items()):
                if proc.poll() is not None or time.monotonic() > end:
                    rcs[name] = procs.wait(proc, 0.1) if proc.poll() is None else procs.wait(proc, 1)
                    (sync / f"ended-{name}").touch()
                    del running[name]
            time.sleep(0.2)
    return rcs


def run_parts(args: argparse.Namespace, state_path: Path, results: Path) -> int:
    """Run the parts in order; the number that failed (a missing module or a failed prepare count all)."""
    start, failed = time.monotonic(), 0
    env = child_env(args.work)
    missing, has_diffusers = preflight(env)
    if missing:
        append(results, kind="error", error=f"missing Python modules: {missing}")
        print(f"missing Python modules {missing}: install or carry them (see the module docstring); stopping")
        return len(args.parts)
    for name in args.parts:
        if name in DIFFUSERS_PARTS and not has_diffusers:
            append(results, part=name, kind="skipped", reason="diffusers is not importable: pip install diffusers")
            print(f"{name:<19} skipped: diffusers is not importable")
    todo = runnable(args.parts, has_diffusers)
    plan = groups(todo, not args.serial)
    for i, group in enumerate(plan):
        left = args.budget_s - (time.monotonic() - start)
        label = "+".join(group)
        need = max(MIN_S[n] for n in group) * (0.25 if args.quick else 1.0)
        if left < need:
            for name in group:
                append(results, part=name, kind="skipped", reason=f"{left:.0f} s of --budget-s left, needs {need:.0f}")
            print(f"{label:<19} skipped: {left:.0f} s of the budget left")
            continue
        slot = slot_for(group, [n for g in plan[i + 1:] for n in g], left, args.quick)
        began = time.monotonic()
        rcs = run_group(group, args, state_path, results, env, slot)
        wall = time.monotonic() - began
        for name in group:
            append(results, part=name, kind="part-end", rc=rcs[name], wall_s=round(wall, 1), slot_s=round(slot, 1),
                   concurrent_with=[n for n in group if n != name])
            print(f"{name:<19} rc={rcs[name]} {wall:6.1f} s (limit {slot:.0f} s)", flush=True)
            failed += rcs[name] != 0
        if group == ("prepare",) and rcs["prepare"] != 0:
            print(f"prepare failed: see {args.out / 'children.log'}; stopping")
            return len(args.parts)
    return failed


def _rows(results: Path) -> list[dict]:
    """The results file's JSON lines; a line cut short by a killed child is skipped."""
    rows = []
    for line in results.read_text().splitlines() if results.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize(results: Path, out: Path) -> None:
    rows = _rows(results)
    timings = [r for r in rows if r.get("kind") == "timing"]
    summary = {"env": next((r for r in rows if r.get("kind") == "env"), None), "timings": timings,
               "compile": [r for r in rows if r.get("kind") == "compile"],
               "agreement": [r for r in rows if r.get("kind") == "agreement"],
               "sdpa": [r for r in rows if r.get("kind") == "sdpa"],
               "problems": [r for r in rows if r.get("kind") in ("error", "skipped")]}
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, out / "summary.json")
    for r in timings:
        print(f"{r['variant']:<19} batch {r['batch']}: median {r['median_s']:.4f} s over {r['runs']} runs, "
              f"first call {r['first_call_s']:.1f} s, {r['images_per_s']:.2f} img/s")
    for r in summary["agreement"]:
        print(f"agreement {r['a']} vs {r['b']}: latents rel L2 {r['latents_rel_l2']:.2e}, "
              f"max pixel diff {r['max_pixel_diff']}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="results folder (results.jsonl, summary.json, children.log)")
    p.add_argument("--work", type=Path, help="weights, compiler caches, compared outputs (default: a temp folder)")
    p.add_argument("--budget-s", type=float, default=440.0, help="wall seconds for all parts together")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated, from: {', '.join(PARTS)} (prepare always runs first)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 50; --quick 5)")
    p.add_argument("--runs", type=int, help="timed runs per row after the first call (default 10; --quick 3)")
    p.add_argument("--eager-runs", type=int, default=5, help="timed runs of the slow eager reference loop")
    p.add_argument("--throughput-runs", type=int, default=5)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    p.add_argument("--quick", action="store_true", help="tiny model smoke run (runs on a CPU too)")
    p.add_argument("--serial", action="store_true", help="compile ours and diffusers one after the other")
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        if args.out is None:
            p.error("--out DIR is required")
        args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
        unknown = [s for s in args.parts if s not in PARTS]
        if unknown:
            p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
        args.parts = ["prepare"] + [s for s in args.parts if s != "prepare"]  # weights (reused if there) and env
        args.steps = args.steps or (5 if args.quick else 50)
        args.runs = args.runs or (3 if args.quick else 10)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child:
        return child(args.child, args.state, args.deadline)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or Path(tempfile.gettempdir()) / "sdengine-gpu-fastpath"
    args.work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.work / "compare", ignore_errors=True)  # outputs compared are this run's only
    shutil.rmtree(args.work / "sync", ignore_errors=True)     # turns on the GPU: this run's parts only
    (args.work / "sync").mkdir()
    results = args.out / "results.jsonl"
    state = {"results": str(results), "work": str(args.work), "quick": args.quick, "steps": args.steps,
             "runs": args.runs, "eager_runs": args.eager_runs, "throughput_runs": args.throughput_runs,
             "batches": args.batches, "compile_mode": args.compile_mode}
    state_path = args.work / "state.json"
    state_path.write_text(json.dumps(state, indent=1) + "\n")
    append(results, kind="start", argv=sys.argv[1:], budget_s=args.budget_s, parts=args.parts)
    try:
        failed = run_parts(args, state_path, results)
    finally:  # interrupted too: what was measured is summarized
        summarize(results, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
