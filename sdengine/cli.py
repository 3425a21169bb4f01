"""The `sdengine` command line: generate, export, tiny-model, train-demo, train-lora. argparse lives here only."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import InvalidInputError, SDEngineError
from . import build_cli  # loads no tensorrt or torch
from .bench import cli as bench_cli  # loads no torch
from .bench.settings import load_options
from .export.settings import DEFAULT_INT8, INT8_OPS  # loads no torch
from .samplers import build_schedule, canonical_name, sampler_names  # numpy only
from .specs import VALIDATE_QUICK, VALIDATION_MODES  # numpy only
from .serve import cli as serve_cli  # loads no uvicorn, starlette or torch

MAX_STEPS = 1000


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text to image (PyTorch reference, ONNX Runtime or TensorRT)")
    p.add_argument("prompt")
    p.add_argument("--model", help="diffusers folder or single-file .safetensors checkpoint "
                   "(default: the embedded demo model); with --backend onnxruntime, a folder from sdengine export; "
                   "with --backend tensorrt, an engine set from sdengine build")
    p.add_argument("--backend", choices=("torch", "onnxruntime", "tensorrt"), default="torch",
                   help="torch (the reference, default), onnxruntime (an exported folder; no torch needed) or "
                        "tensorrt (an engine set on an NVIDIA GPU; no torch needed)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--no-prompt-weighting", action="store_true",
                   help="read (, ), [ and ] as text: no A1111 emphasis such as (word:1.3) (README, \"Prompts\")")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="a textual inversion embedding (A1111 or diffusers .safetensors; repeatable): its trigger is "
                        "TOKEN, else the file's token name or file name (README, \"Prompts\")")
    p.add_argument("--clip-skip", type=int, default=None, metavar="N",
                   help="condition on the text encoder's layer -1-N, as diffusers' clip_skip (A1111's "
                        "\"Clip skip: N+1\"; default 0: the last layer)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (1-1000, default 50)")
    p.add_argument("--scheduler", default="ddim", metavar="NAME",
                   help="the sampler: " + ", ".join(sampler_names()) + " (default ddim; A1111's names such as "
                        "\"DPM++ 2M Karras\" or \"Euler a\" work too)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta: 0 deterministic, 1 DDPM-like (ddim only)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    p.add_argument("--height", type=int, default=None,
                   help="pixels, a multiple of the model's VAE factor (8 for SD, 4 for the demo model; default: the "
                        "model's size)")
    p.add_argument("--width", type=int, default=None, help="pixels, as --height")
    p.add_argument("--num-images", type=int, default=1, help="images for the prompt (1-16)")
    p.add_argument("--out", default="image.png", help="output PNG (default image.png); several images get -0, "
                   "-1 ... suffixes")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the usable cores less one, at least 1; see the README)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda with --backend tensorrt, else cpu")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None,
                   help="override for single-file SD 2.x 768-v checkpoints (not visible in the weights)")
    p.add_argument("--image", default=None, metavar="IN.png",
                   help="image to image: start from this picture (any mode; sides not multiples of the VAE factor "
                        "are rounded down unless --height/--width say otherwise)")
    p.add_argument("--mask", default=None, metavar="MASK.png",
                   help="inpainting: repaint the white (or transparent) part of --image, keep the rest")
    p.add_argument("--strength", type=float, default=None,
                   help="how much of --image is repainted, in (0, 1] (default 0.8; 1.0 with --mask)")
    p.add_argument("--mask-blur", type=float, default=0.0, metavar="PX", help="Gaussian blur of the mask in pixels")
    p.add_argument("--keep-unmasked", action="store_true",
                   help="paste the original back outside the (blurred) mask after decoding")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA .safetensors (kohya/A1111 or diffusers/PEFT) merged into the weights at SCALE "
                        "(default 1; repeatable)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a backend load option (repeatable), e.g. with --backend torch --device cuda: "
                        "channels_last=true compile=true cuda_graph=true")
    p.add_argument("--cache-interval", type=int, default=None, metavar="N",
                   help="step caching (DeepCache): the whole U-Net every N steps, its shallow branch in between "
                        "(default 1: off; README, \"Step caching\"); onnxruntime: an export with --step-cache")
    p.add_argument("--cache-branch", type=int, default=None, metavar="K",
                   help="step caching's branch, as the deepcache package's cache_branch_id (default 0: the "
                        "shallowest, fastest); needs --cache-interval 2 or more")


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the networks to validated ONNX graphs (for --backend onnxruntime)")
    p.add_argument("--model", help="diffusers folder or single-file .safetensors checkpoint "
                   "(default: the embedded demo model)")
    p.add_argument("--out", required=True, help="folder to write the graphs, manifest and report to")
    p.add_argument("--fp16", action="store_true", help="fp16 network bodies, for GPUs (the CPU runs them slower than fp32); inputs, "
                   "outputs and the update stay fp32")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17-20, default 17)")
    p.add_argument("--batch", default=None, help="images per call: N, MIN:MAX or MIN:OPT:MAX (default 1:4)")
    p.add_argument("--height", default=None, help="pixels: N, MIN:MAX or MIN:OPT:MAX (default: half to twice "
                                                  "the model's size)")
    p.add_argument("--width", default=None, help="pixels, as --height")
    p.add_argument("--static", action="store_true", help="fixed shapes: one value each (default: the model's "
                                                         "size, 1 image)")
    p.add_argument("--state-slots", type=int, default=None,
                   help="the denoise step's sampler state (default 4: every sampler; 2: DDIM, DDPM, Euler, Euler a, "
                        "LCM, Heun and DPM++ 2M; 1: the single-step samplers only)")
    p.add_argument("--max-prompt-chunks", type=int, default=None, metavar="K",
                   help="the longest prompt the step graph reads, in chunks of 75 tokens (1-8, default 8; "
                        "a static export reads 1)")
    p.add_argument("--unet-graph", action="store_true",
                   help="also write the plain U-Net graph (unet.onnx), for denoise loops of your own; no sdengine "
                        "backend uses it")
    p.add_argument("--step-cache", type=int, nargs="?", const=0, default=None, metavar="BRANCH",
                   help="also export step caching's full and shallow step graphs for this branch (default 0), for "
                        "--cache-interval (README, \"Step caching\"); without it they are not exported")
    p.add_argument("--int8", nargs="?", const=DEFAULT_INT8, default=None, choices=tuple(INT8_OPS), metavar="OPS",
                   help=f"quantize the U-Net's weights to int8 for the CPU (ONNX Runtime dynamic quantization): "
                        f"{' or '.join(INT8_OPS)} (default {DEFAULT_INT8}); the text encoder and VAE stay fp32 "
                        f"(README, \"int8\")")
    p.add_argument("--validate", choices=VALIDATION_MODES, default=VALIDATE_QUICK,
                   help="shape points ONNX Runtime is checked at against torch: quick (default: the smallest shape "
                        "and one with another batch, odd non-square sides and two prompt chunks), or full (also the "
                        "opt shape and the largest: slow, and the memory of running the largest shape)")
    p.add_argument("--force", action="store_true", help="re-export graphs that are up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdengine", description="Stable Diffusion inference engine")
    parser.add_argument("--version", action="version", version=f"sdengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _export_parser(sub)
    serve_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    build_cli.add_parser(sub)
    verify = sub.add_parser("verify", help="compare every file of an ONNX export folder with the sha256 recorded "
                            "at export (a load checks sizes and a fingerprint only)")
    verify.add_argument("folder", help="a folder written by sdengine export")
    tiny = sub.add_parser("tiny-model", help="write a small random-weight model folder for trying things out")
    tiny.add_argument("out", help="folder to create")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--force", action="store_true", help="replace the folder if it exists")
    tiny.add_argument("--sdxl", action="store_true", help="a tiny SDXL-shaped model (two text encoders, "
                      "micro-conditioning; the torch backend runs it)")
    train = sub.add_parser("train-demo", help="train the embedded demo model on captioned shapes (CPU, ~1 hour)")
    train.add_argument("out", help="folder to write the trained model to (diffusers layout)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--vae-steps", type=int, default=None)
    train.add_argument("--unet-steps", type=int, default=None)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    train.add_argument("--force", action="store_true", help="replace the folder if it exists")
    lora = sub.add_parser("train-lora", help="train the demo LoRA that teaches the embedded model a new shape "
                                             "(\"star\"; CPU, minutes)")
    lora.add_argument("--out", default="star.safetensors", help="LoRA file to write (default star.safetensors)")
    lora.add_argument("--model", default=None, help="demo model folder to train on (default: the embedded one)")
    lora.add_argument("--seed", type=int, default=None)
    lora.add_argument("--steps", type=int, default=None)
    lora.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 2)")
    lora.add_argument("--force", action="store_true", help="replace the file if it exists")
    return parser


def _check_argv_text(option: str, text: str | None) -> None:
    """Command-line text that was not UTF-8 arrives with surrogate escapes: refuse it in one line."""
    bad = next((i for i, c in enumerate(text or "") if "\udc80" <= c <= "\udcff"), None)
    if bad is not None:
        raise InvalidInputError(f"{option} is not valid UTF-8: byte 0x{ord(text[bad]) - 0xDC00:02x} at character "
                                f"{bad}; pass the text in UTF-8")


def _validate_image_options(args: argparse.Namespace) -> None:
    """The image options' own limits, and the files exist and decode (before any model loads)."""
    from .images import load_image, load_mask

    if args.image is None:
        for option, value in (("--mask", args.mask), ("--strength", args.strength),
                              ("--mask-blur", args.mask_blur or None), ("--keep-unmasked", args.keep_unmasked or None)):
            if value is not None:
                raise InvalidInputError(f"{option} needs --image")
        return
    if args.strength is not None and (not math.isfinite(args.strength) or not 0 < args.strength <= 1):
        raise InvalidInputError(f"--strength must be in (0, 1], got {args.strength}")
    if not math.isfinite(args.mask_blur) or not 0 <= args.mask_blur <= 256:
        raise InvalidInputError(f"--mask-blur must be between 0 and 256 pixels, got {args.mask_blur}")
    picture = load_image(args.image, "--image")
    if args.mask is not None:
        load_mask(args.mask, picture.size, "--mask")


def _peek_config(args: argparse.Namespace):
    """The model's config read from its small files, before any weights load (None for a single file)."""
    from .config import ModelConfig

    if args.model is None:
        from .demo import embedded_model_path

        return ModelConfig.from_diffusers_folder(embedded_model_path())
    path = Path(args.model).expanduser()
    if args.backend == "onnxruntime":
        from .manifest import Manifest

        return Manifest.read(path).config
    if args.backend == "tensorrt":
        from .engine_manifest import read

        return read(path).config
    return ModelConfig.from_diffusers_folder(path) if (path / "model_index.json").is_file() else None


def _validate(args: argparse.Namespace) -> None:
    """Check the cheap parameters, and those the model's config files decide, before any weights load."""
    from .pipeline import MAX_IMAGES_PER_PROMPT, check_guidance, check_size, output_paths

    _check_argv_text("the prompt", args.prompt)
    _check_argv_text("--negative-prompt", args.negative_prompt)
    if not 1 <= args.steps <= MAX_STEPS:
        raise InvalidInputError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    check_guidance(args.guidance)
    if not math.isfinite(args.eta) or args.eta < 0:
        raise InvalidInputError(f"--eta must be a finite number >= 0, got {args.eta}")
    if not 1 <= args.num_images <= MAX_IMAGES_PER_PROMPT:
        raise InvalidInputError(f"--num-images must be between 1 and {MAX_IMAGES_PER_PROMPT}, got {args.num_images}")
    if args.seed is not None and args.seed < 0:
        raise InvalidInputError(f"--seed must be >= 0, got {args.seed}")
    if args.threads is not None and args.threads < 1:
        raise InvalidInputError(f"--threads must be >= 1, got {args.threads}")
    _validate_image_options(args)
    _validate_loras(args)
    output_paths(args.out, args.num_images)
    if args.backend == "onnxruntime" and args.model is None:
        raise InvalidInputError("--backend onnxruntime needs --model: a folder written by sdengine export "
                                "(sdengine export --model MODEL --out DIR)")
    if args.backend == "tensorrt":
        _validate_tensorrt(args)
    canonical_name(args.scheduler)
    config = _peek_config(args)
    if config is None:  # a single-file checkpoint: the pipeline checks the rest once it is read
        return
    config = config.with_prediction_type(args.prediction_type)
    from .stepcache import check_step_cache

    check_step_cache(args.cache_interval, args.cache_branch, config.unet)
    for name in ("height", "width"):
        if getattr(args, name) is not None:
            check_size(f"--{name}", getattr(args, name), config.vae.downscale)
    try:
        strength = 1.0 if args.image is None else args.strength or (1.0 if args.mask else 0.8)
        schedule = build_schedule(config.scheduler, args.scheduler, args.steps, args.eta, strength=strength)
    except InvalidInputError as exc:
        raise InvalidInputError(f"{exc} (--scheduler {args.scheduler}, --steps {args.steps}, --eta {args.eta:g})") \
            from None
    if args.backend == "onnxruntime":
        from .manifest import Manifest
        from .samplers.table import fit_slots

        size = config.default_size
        ranges = Manifest.read(args.model).ranges
        ranges.check(args.num_images, args.height or size, args.width or size)
        fit_slots(schedule, ranges.slots, "re-export with sdengine export --state-slots {slots} or more")


def _validate_loras(args: argparse.Namespace) -> None:
    """--lora FILE[:SCALE]: each file exists and is not a pickle, before any weights load."""
    from .files import refuse_pickle
    from .lora import lora_specs, parse_cli_lora

    args.loras = lora_specs([parse_cli_lora(text) for text in args.lora])
    for path, _ in args.loras:
        refuse_pickle(path)
        if not path.is_file():
            raise InvalidInputError(f"--lora {path}: no such file")


def _validate_tensorrt(args: argparse.Namespace) -> None:
    """cuda-python, TensorRT and a GPU are here, and --model names an engine set (sdengine build)."""
    from .backends.tensorrt_backend import check_available

    check_available(_device(args))
    if args.model is None:
        raise InvalidInputError("--backend tensorrt needs --model: an engine set written by sdengine build "
                                "(sdengine build --onnx DIR --out engines/NAME)")


def _device(args: argparse.Namespace) -> str:
    return args.device or ("cuda" if args.backend == "tensorrt" else "cpu")


def _progress(total_label: str):
    """A tqdm callback on a terminal, None otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(desc=total_label, unit="step", leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update, bar


def _load_options(args: argparse.Namespace) -> dict:
    """--option KEY=VALUE, plus --threads (default: the usable cores less one) for the CPU backends."""
    from .backends import default_threads

    options = load_options(args.option)
    if args.backend in ("torch", "onnxruntime") and "threads" not in options:
        options["threads"] = args.threads or default_threads()
    elif args.threads is not None:
        raise InvalidInputError("--threads applies to --backend torch and onnxruntime; TensorRT runs on the GPU")
    if args.prediction_type:
        options["prediction_type"] = args.prediction_type
    return options


def cmd_generate(args: argparse.Namespace) -> int:
    _validate(args)
    from .pipeline import load_pipeline

    pipe = load_pipeline(args.model, backend=args.backend, device=_device(args), loras=dict(args.loras),
                         **_load_options(args))
    if args.embedding:
        from .embeddings import parse_spec

        for spec in args.embedding:
            pipe.load_textual_inversion(*parse_spec(spec))
    callback, bar = _progress("denoising")
    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                      guidance_scale=args.guidance, eta=args.eta, seed=args.seed, height=args.height,
                      width=args.width, num_images_per_prompt=args.num_images, callback=callback,
                      scheduler=args.scheduler, image=args.image, mask_image=args.mask, strength=args.strength,
                      mask_blur=args.mask_blur, keep_unmasked=args.keep_unmasked,
                      prompt_weighting=not args.no_prompt_weighting, clip_skip=args.clip_skip,
                      cache_interval=args.cache_interval, cache_branch=args.cache_branch)
    finally:
        if bar is not None:
            bar.close()
    for path, seed in zip(result.save(args.out), result.seeds):
        print(f"{path} (seed {seed})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.settings import ExportSettings, parse_range
    from .specs import UNET

    ranges = {name: None if getattr(args, name) is None else parse_range(getattr(args, name), name)
              for name in ("batch", "height", "width")}
    slots = {} if args.state_slots is None else {"state_slots": args.state_slots}
    if args.max_prompt_chunks is not None:
        slots["max_prompt_chunks"] = args.max_prompt_chunks
    if args.unet_graph:
        slots["graphs"] = ExportSettings().graphs + (UNET,)
    settings = ExportSettings(precision="fp16" if args.fp16 else "fp32", opset=args.opset, static=args.static,
                              force=args.force, step_cache=args.step_cache, int8=args.int8, validate=args.validate,
                              **ranges, **slots)
    if args.model is None:
        from .demo import embedded_model_path

        args.model = str(embedded_model_path())
    if not Path(args.model).exists():
        raise InvalidInputError(f"--model {args.model} does not exist: give a diffusers folder or a .safetensors file")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InvalidInputError(f"--out {args.out} is a file; give a folder")
    from .export import export_model

    results = export_model(args.model, args.out, settings)
    written = sum(r.status == "passed" for r in results)
    print(f"{args.out}: {written} graph(s) written, {len(results) - written} up to date; "
          f"try: sdengine generate \"{_example_prompt(args.model)}\" --backend onnxruntime --model {args.out}")


def cmd_verify(args: argparse.Namespace) -> int:
    import time

    from .manifest import Manifest

    started = time.perf_counter()
    files = Manifest.read(args.folder).verify()
    size = sum(f.stat().st_size for f in files)
    print(f"{args.folder}: {len(files)} file(s), {size / 1e6:.1f} MB, each as exported (sha256; "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _example_prompt(model: str | None) -> str:
    """A prompt the model can draw: the demo model knows only coloured shapes."""
    from .demo import EMBEDDED_MODEL

    if model is None or Path(model).expanduser().resolve() == EMBEDDED_MODEL:
        return "a green square on a black background"
    return "an astronaut riding a horse"
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    if Path(args.out).exists() and not args.force:
        raise InvalidInputError(f"{args.out} exists; pass --force to replace it, or choose another folder")
    from .config import ModelConfig
    from .models.saving import write_random_model

    config = ModelConfig.tiny_sdxl() if args.sdxl else ModelConfig.tiny()
    out = write_random_model(args.out, config, seed=args.seed, overwrite=args.force)
    print(f"wrote a random-weight tiny model to {out} (it draws noise); try: sdengine generate \"a cat\" "
          f"--model {out}")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .demo.train import Recipe, train

    given = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "threads": args.threads}
    recipe = dataclasses.replace(Recipe(), **{k: v for k, v in given.items() if v is not None})
    if Path(args.out).exists() and not args.force:
        raise InvalidInputError(f"{args.out} exists; pass --force to replace it")
    out = train(args.out, recipe, overwrite=args.force)
    print(f"wrote the trained demo model to {out}")
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    import dataclasses

    from .demo import EMBEDDED_MODEL
    from .demo.lora_train import LoraRecipe, train_lora

    for name in ("steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InvalidInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    given = {"seed": args.seed, "steps": args.steps, "threads": args.threads}
    recipe = dataclasses.replace(LoraRecipe(), **{k: v for k, v in given.items() if v is not None})
    out = train_lora(args.out, recipe, model=args.model or EMBEDDED_MODEL, overwrite=args.force)
    print(f"wrote the LoRA to {out}; try: sdengine generate \"a red star on a white background\" --lora {out}")
    return 0


class _LowerLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(logging.makeLogRecord({**record.__dict__, "levelname": record.levelname.lower()}))


class _Stderr(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record is emitted, so a caller that redirects it (an embedding
    program, a test calling `main`) gets the warnings too."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _log_to_stderr() -> None:
    """sdengine's warnings as one line each on stderr: `sdengine: warning: ...`."""
    logger = logging.getLogger("sdengine")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(_LowerLevel("sdengine: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else list(argv)):
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    _log_to_stderr()
    commands = {"generate": cmd_generate, "export": cmd_export, "tiny-model": cmd_tiny_model,
                "train-demo": cmd_train_demo, "verify": cmd_verify, "train-lora": cmd_train_lora, "serve": serve_cli.run, "build": build_cli.run,
                "bench": bench_cli.run}
    try:
        return commands[args.command](args)
    except SDEngineError as exc:
        print(f"sdengine: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sdengine: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sdengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
