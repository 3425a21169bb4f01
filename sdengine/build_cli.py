"""`sdengine build`: argparse at the edge; the work is sdengine.engine_build.build_engines. No torch."""

from __future__ import annotations

import argparse

from .engine_manifest import BuilderSettings
from .export.settings import parse_range


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `build` on the `sdengine` command's subparsers."""
    p = subparsers.add_parser(
        "build", help="compile an fp16 ONNX export to TensorRT engines (needs TensorRT and an NVIDIA GPU)",
        description="Build one TensorRT engine per graph of an fp16 ONNX export (sdengine export --fp16) into an "
                    "engine set folder with a manifest; run it with --backend tensorrt.")
    p.add_argument("--onnx", required=True, help="folder written by sdengine export --fp16")
    p.add_argument("--out", required=True, help="engine set folder to write, e.g. engines/NAME (an existing set is "
                                                "replaced once the new one is complete)")
    p.add_argument("--static", action="store_true", help="one shape: N for --batch, --height, --width (default: "
                                                         "the export's opt point)")
    p.add_argument("--batch", default=None, help="images per call: N, MIN:MAX or MIN:OPT:MAX within the export's "
                                                 "range (default: the export's)")
    p.add_argument("--height", default=None, help="pixels: N, MIN:MAX or MIN:OPT:MAX (default: the export's)")
    p.add_argument("--width", default=None, help="pixels, as --height")
    p.add_argument("--timing-cache", default=None, help="TensorRT timing cache file, read if present and saved "
                                                        "after each engine (speeds up rebuilds)")
    p.add_argument("--workspace-gb", type=float, default=None, help="builder workspace limit in GiB (default: "
                                                                    "TensorRT's, the GPU's memory)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0-5 (default 3)")
    p.add_argument("--refittable", action="store_true", help="build refittable engines (weights can be swapped)")
    p.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    return p


def run(args: argparse.Namespace) -> int:
    """Validate the arguments, then build (TensorRT is imported only once they pass)."""
    from pathlib import Path

    from .engine_build import BuildSettings, build_engines

    ranges = {name: None if getattr(args, name) is None else parse_range(getattr(args, name), name)
              for name in ("batch", "height", "width")}
    cache = None if args.timing_cache is None else str(Path(args.timing_cache).expanduser().absolute())
    builder = BuilderSettings(workspace_gb=args.workspace_gb, opt_level=args.opt_level, refittable=args.refittable,
                              timing_cache=cache)
    settings = BuildSettings(static=args.static, builder=builder, verbose=args.verbose, **ranges)
    build_engines(args.onnx, args.out, settings, log=lambda line: print(line, flush=True))
    return 0
