"""`sdengine bench`: argparse at the edge; the run itself is sdengine.bench.runner."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InvalidInputError, SDEngineError
from .settings import COMPARISONS, COMPILE_MODES, PARTS, RANDOM_MODELS, BenchSettings, parse_subjects

EXAMPLES = """examples:
  sdengine bench                                          # torch, embedded demo model (about a minute on 2 cores)
  sdengine bench --backend torch onnxruntime --compare diffusers --json out.json
  sdengine bench --random-model sd15 --size 512 --steps 50 --device cuda --batches 1 2 4 8 \\
      --compare diffusers diffusers-compiled          # issue 6's setting, SD 1.5-shaped random weights
  sdengine bench --random-model sd15 --size 256 --steps 1 --only denoise_step --batches 1 \\
      --backend torch onnxruntime --compare diffusers   # one SD 1.5-shaped U-Net step, 32x32 latent
  sdengine bench --backend torch fast=torch --option fast:compile=true   # backend options, labelled"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `bench` on the `sdengine` command's subparsers."""
    p = subparsers.add_parser("bench", help="latency, stages, throughput, memory; against diffusers in the same run",
                              description="Measure backends (and diffusers on the same weights) in one run: "
                                          "end-to-end p50/p95, per-stage latency, images/s per batch size, "
                                          "peak memory, load and warm-up time. Each subject runs in its own process.",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers folder or .safetensors file, or a folder from sdengine export "
                   "(default: the embedded demo model)")
    p.add_argument("--random-model", choices=RANDOM_MODELS, help="random weights of this shape instead of --model "
                   "(seeded by --seed), written to a temporary folder")
    p.add_argument("--backend", nargs="+", default=["torch"], metavar="[LABEL=]NAME",
                   help="sdengine backends to measure (default: torch); LABEL=NAME measures one backend twice")
    p.add_argument("--option", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                   help="a load option passed to the backend (repeatable; JSON values: true, 3, \"text\")")
    p.add_argument("--backend-model", action="append", default=[], metavar="LABEL=PATH",
                   help="the folder a backend loads, when not the bench's own model or export")
    p.add_argument("--compare", nargs="+", default=[], choices=COMPARISONS,
                   help="diffusers' StableDiffusionPipeline on the same weights: eager, and compiled (GPU only)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="auto",
                   help="torch.compile mode of diffusers-compiled (auto: reduce-overhead, i.e. CUDA graphs)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--prompt", default=BenchSettings.prompt)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20; issue 6's setting is 50)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=10, help="counted runs per series (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted calls before each series (default 2)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8], help="images per call for throughput")
    p.add_argument("--throughput-runs", type=int, default=3, help="counted calls per batch size (default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime "
                                                             "(default: all cores)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), metavar="PART",
                   help=f"measure only these parts: {', '.join(PARTS)}")
    p.add_argument("--export-precision", choices=("fp32", "fp16"), default="fp32",
                   help="precision of the ONNX export made for --backend onnxruntime")
    p.add_argument("--onnx-dir", help="keep the ONNX export here (reused when up to date) instead of a temp folder")
    p.add_argument("--json", type=Path, help="write the full results here (atomically, after every subject)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    from ..backends import BACKENDS

    if args.size is not None and (args.height is not None or args.width is not None):
        raise InvalidInputError("give --size, or --height and --width, not both")
    subjects = parse_subjects(args.backend, args.compare, args.option, args.backend_model, BACKENDS)
    kwargs = {} if args.threads is None else {"threads": args.threads}
    return BenchSettings(
        subjects=subjects, model=args.model, random_model=args.random_model, device=args.device, prompt=args.prompt,
        steps=args.steps, height=args.height or args.size, width=args.width or args.size, guidance=args.guidance,
        seed=args.seed, runs=args.runs, warmup=args.warmup, batches=tuple(args.batches),
        throughput_runs=args.throughput_runs, parts=tuple(p for p in PARTS if p in args.only),
        compile_mode=args.compile_mode, export_precision=args.export_precision, onnx_dir=args.onnx_dir,
        **kwargs).check()


def command_line(s: BenchSettings, json_path: Path | None) -> list[str]:
    """The command that repeats this run, every setting spelled out."""
    argv = ["sdengine", "bench"]
    argv += ["--model", s.model] if s.model else ["--random-model", s.random_model] if s.random_model else []
    backends = [x for x in s.subjects if x.kind == "backend"]
    if backends:
        argv += ["--backend", *(x.backend if x.label == x.backend else f"{x.label}={x.backend}" for x in backends)]
    for x in backends:
        argv += [a for k, v in x.options for a in ("--option", f"{x.label}:{k}={json.dumps(v)}")]
        argv += ["--backend-model", f"{x.label}={x.model}"] if x.model else []
    compare = [x.label for x in s.subjects if x.kind == "diffusers"]
    argv += ["--compare", *compare, "--compile-mode", s.compile_mode] if compare else []
    argv += ["--device", s.device, "--prompt", s.prompt, "--steps", str(s.steps)]
    argv += ["--height", str(s.height)] if s.height else []
    argv += ["--width", str(s.width)] if s.width else []
    argv += ["--guidance", f"{s.guidance:g}", "--seed", str(s.seed), "--runs", str(s.runs), "--warmup", str(s.warmup),
             "--batches", *map(str, s.batches), "--throughput-runs", str(s.throughput_runs), "--only", *s.parts]
    argv += ["--threads", str(s.threads)] if s.threads else []
    if any(x.backend == "onnxruntime" for x in backends):
        argv += ["--export-precision", s.export_precision] + (["--onnx-dir", s.onnx_dir] if s.onnx_dir else [])
    return argv + (["--json", str(json_path)] if json_path else [])


def run(args: argparse.Namespace) -> int:
    """Measure, print the tables, write --json; 2 when a subject failed on an SDEngineError, 1 on any other."""
    settings = settings_from_args(args)
    if args.json is not None and not args.json.parent.is_dir():
        raise InvalidInputError(f"the folder of --json, {args.json.parent}, does not exist")
    if any(s.kind == "diffusers" for s in settings.subjects):
        from .diffusers_stages import require_diffusers

        require_diffusers()
    from . import report
    from .runner import run_bench

    log = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    doc = run_bench(settings, command_line(settings, args.json), args.json, log)
    print(report.tables(doc), end="")
    if args.json is not None:
        print(f"wrote {args.json}")
    failed = [r for r in doc["subjects"] if "error" in r]
    for r in failed:
        print(f"sdengine: error: {r['label']}: {r['error']}", file=sys.stderr)
    if not failed:
        return 0
    return 2 if all(_is_sdengine(r) for r in failed) else 1


def _is_sdengine(result: dict) -> bool:
    import sdengine.errors as errors

    kind = getattr(errors, str(result.get("error_type")), None)
    return isinstance(kind, type) and issubclass(kind, SDEngineError)
