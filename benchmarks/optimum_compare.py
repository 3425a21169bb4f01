"""sdengine's ONNX Runtime pipeline against Hugging Face optimum's ORTStableDiffusionPipeline (issue 18).

Subjects (--subjects, any of):
  sdengine-ort       sdengine's onnxruntime backend on an `sdengine export` folder (fp32; the reference)
  sdengine-ort-fp16  the same on an fp16 export
  sdengine-ort-int8  the same on an `--int8 matmul` export (the U-Net's MatMul weights int8, the rest fp32)
  optimum-ort        optimum's ORTStableDiffusionPipeline, exported from the same diffusers folder; it runs with
                     --optimum-python (its own venv: optimum-onnx cannot be installed beside diffusers 0.42;
                     make it with benchmarks/optimum_env.sh)
  diffusers          diffusers' StableDiffusionPipeline, eager, in sdengine's venv (this script's python)
  sdengine-torch     sdengine's torch backend on the diffusers folder

Method: the model is a diffusers folder (--model) or random weights written by sdengine's own writer
(--random-model tiny|sd15, as `sdengine bench --random-model`). Each subject that needs one gets a
one-time export in its own process: wall time and that process's peak RSS (os.wait4's ru_maxrss). Then,
per --threads value, every subject is started in its own process (OMP_NUM_THREADS, MKL_NUM_THREADS, ONNX
Runtime intra-op threads and torch's threads all set to it), loaded (timed, peak RSS after load), and kept
alive; images are then made one at a time, round-robin between the subjects (--warmup uncounted rounds,
then --images counted ones), each from the same initial latents (numpy, seeded, handed over as a .npy
file), the DDIM scheduler from the folder's config (eta 0), one prompt with an empty negative prompt. A
worker talks to this parent by JSON lines on its stdin/stdout. Every subject's image is compared with
sdengine-ort's (max and mean absolute difference, in 1/255). Output: a JSON document and a markdown
table (--out-dir), both written to a temporary name and renamed.

  python benchmarks/optimum_compare.py --random-model tiny --threads 1 --steps 3 --images 3
  python benchmarks/optimum_compare.py --random-model sd15 --size 128 --steps 10 --threads 1 2 --fp16

Peak RSS figures are Linux's VmHWM (peak resident set of that process). All subjects of one thread count
are alive at once: on SD 1.5 that is several GB each, so on a small machine run them in groups that each
include sdengine-ort (the reference), the later groups with --reuse FIRST_RUN_WORK_FOLDER (no re-export).

This file must import with the standard library only at module level: the optimum venv runs it too
(worker mode), without sdengine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
REFERENCE = "sdengine-ort"
SUBJECTS = ("sdengine-ort", "sdengine-ort-fp16", "sdengine-ort-int8", "optimum-ort", "diffusers", "sdengine-torch")
EXPORTED = {"sdengine-ort": "fp32", "sdengine-ort-fp16": "fp16", "sdengine-ort-int8": "int8", "optimum-ort": "fp32"}
OPTIMUM_SUBJECTS = ("optimum-ort",)
PACKAGES = ("numpy", "torch", "onnx", "onnxruntime", "diffusers", "transformers", "optimum", "optimum-onnx",
            "sdengine", "safetensors", "huggingface-hub")
DEFAULT_PROMPT = "a red circle on a blue background"
KIB = 1024


# ---------------------------------------------------------------- small helpers (standard library only)

def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is not what a report file should have
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def vm_kib(field: str) -> int | None:
    """A `field: N kB` line of /proc/self/status (VmHWM: peak RSS), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / KIB, 1)


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


# ---------------------------------------------------------------- report (pure: unit-tested)

def summarise(seconds: Sequence[float]) -> dict[str, Any]:
    return {"seconds": [round(s, 4) for s in seconds], "median_s": round(statistics.median(seconds), 4)
            if seconds else None, "min_s": round(min(seconds), 4) if seconds else None}


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference (time against sdengine-ort fp32's: above 1 is slower), None when either is missing."""
    if value is None or reference in (None, 0):
        return None
    return value / reference


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def table(doc: dict[str, Any]) -> str:
    """A markdown table per the JSON document: per thread count the median per image and its ratio to
    sdengine-ort's, then load, export and memory figures and the image difference to sdengine-ort."""
    runs = doc.get("runs", [])
    subjects = doc["settings"]["subjects"]
    head = ["subject"] + [f"{r['threads']} thread{'s' * (r['threads'] > 1)}: s/image (ratio)" for r in runs]
    head += ["load s", "load peak MiB", "peak RSS MiB", "export s", "export peak MiB", "image vs sdengine-ort (/255)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    exports = doc.get("exports", {})
    for name in subjects:
        row = [name]
        loads, load_peaks, peaks, diffs = [], [], [], []
        for run in runs:
            res = run["subjects"].get(name, {})
            ref = run["subjects"].get(REFERENCE, {}).get("median_s")
            med = res.get("median_s")
            if "error" in res:
                row.append("error")
            else:
                row.append(f"{_fmt(med, '.3f')} ({_fmt(ratio(med, ref), '.2f')})")
            loads.append(_fmt(res.get("load_s"), ".2f"))
            load_peaks.append(_fmt(res.get("load_peak_mib"), ".0f"))
            peaks.append(_fmt(res.get("peak_rss_mib"), ".0f"))
            d = res.get("image_vs_reference")
            diffs.append("-" if not d else f"max {d['max_abs_255']:.2g}, mean {d['mean_abs_255']:.2g}")
        ex = exports.get(name, {})
        row += [" / ".join(loads), " / ".join(load_peaks), " / ".join(peaks),
                "error" if "error" in ex else "reused" if "reused_from" in ex else _fmt(ex.get("export_s"), ".1f"),
                _fmt(ex.get("peak_rss_mib"), ".0f"), " / ".join(diffs)]
        lines.append("| " + " | ".join(row) + " |")
    note = ("Ratios: median time per image / sdengine-ort's median in the same run (above 1 is slower). "
            "Figures with '/' are per thread count, in the order of the columns.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def image_difference(image: Any, reference: Any) -> dict[str, float]:
    """Max and mean |a - b| of two float images in [0, 1], in units of 1/255."""
    import numpy as np

    a, b = np.asarray(image, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} against {b.shape}")
    d = np.abs(a - b) * 255
    return {"max_abs_255": float(d.max()), "mean_abs_255": float(d.mean())}


# ---------------------------------------------------------------- worker side: export and generation

def export_subject(subject: str, source: str, out: str, height: int, width: int) -> None:
    """One-time export for `subject` into `out` (run in its own process; the parent times it)."""
    if subject.startswith("sdengine-ort"):
        from sdengine.export import export_model
        from sdengine.export.settings import ExportSettings

        kind = EXPORTED[subject]
        settings = ExportSettings(precision="fp32" if kind == "int8" else kind, batch=(1,), height=(height,),
                                  width=(width,), static=True, int8="matmul" if kind == "int8" else None)
        export_model(source, out, settings, log=lambda m: print(m, file=sys.stderr))
    elif subject == "optimum-ort":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        pipe = ORTStableDiffusionPipeline.from_pretrained(source, export=True)
        pipe.save_pretrained(out)
    else:
        raise SystemExit(f"{subject} has no export step")


class Runner:
    """One loaded subject: generate(latents) -> float image [H, W, 3] in [0, 1]."""

    def __init__(self, subject: str, model: str, job: dict[str, Any], threads: int) -> None:
        self.subject, self.job = subject, job
        if subject.startswith("sdengine"):
            from sdengine.backends import load_backend
            from sdengine.pipeline import Pipeline

            if subject == "sdengine-torch":
                import torch

                torch.set_num_threads(threads)
                backend = load_backend(model, backend="torch", device="cpu")
            else:
                backend = load_backend(model, backend="onnxruntime", device="cpu", threads=threads)
            self.pipe = Pipeline(backend)
        else:
            import diffusers
            import torch

            torch.set_num_threads(threads)
            diffusers.utils.logging.disable_progress_bar()
            if subject == "optimum-ort":
                import onnxruntime as ort
                from optimum.onnxruntime import ORTStableDiffusionPipeline

                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                pipe = ORTStableDiffusionPipeline.from_pretrained(model, provider="CPUExecutionProvider",
                                                                  session_options=options)
            else:
                pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                    model, safety_checker=None, requires_safety_checker=False)  # fp32, the default
            pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
            pipe.set_progress_bar_config(disable=True)
            self.torch, self.pipe = torch, pipe
            if subject == "optimum-ort":  # what the U-Net's session was really given
                self.session_threads = pipe.unet.session.get_session_options().intra_op_num_threads

    def generate(self, latents: Any) -> Any:
        j = self.job
        kwargs = {"negative_prompt": "", "num_inference_steps": j["steps"], "guidance_scale": j["guidance"],
                  "height": j["height"], "width": j["width"], "output_type": "np"}
        if self.subject.startswith("sdengine"):
            images = self.pipe(j["prompt"], latents=latents, eta=0.0, **kwargs).images
        else:
            with self.torch.no_grad():
                images = self.pipe(j["prompt"], latents=self.torch.from_numpy(latents), eta=0.0, **kwargs).images
        import numpy as np

        return np.asarray(images[0], dtype=np.float32)


def worker(args: argparse.Namespace) -> int:
    """Line protocol: one JSON line after load, then per `image PATH` line on stdin one JSON line with
    the seconds (the image saved to PATH as .npy); `quit` answers with the peak RSS and exits."""
    import numpy as np

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the protocol

    def say(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")

    job = json.loads(Path(args.job).read_text())
    latents = np.load(job["latents"])
    try:
        start = time.perf_counter()
        runner = Runner(args.subject, args.model, job, args.threads)
        say({"load_s": time.perf_counter() - start, "load_peak_mib": mib(vm_kib("VmHWM")),
             "versions": versions(), "torch_imported": "torch" in sys.modules,
             **({"session_intra_op_threads": runner.session_threads} if hasattr(runner, "session_threads") else {})})
    except Exception as exc:  # the parent reports it and goes on with the other subjects
        import traceback

        traceback.print_exc()
        say({"error": f"{type(exc).__name__}: {exc}"[:500]})
        return 1
    for line in sys.stdin:
        command, _, path = line.strip().partition(" ")
        if command == "quit":
            say({"peak_rss_mib": mib(vm_kib("VmHWM"))})
            return 0
        try:
            start = time.perf_counter()
            image = runner.generate(latents)
            seconds = time.perf_counter() - start
            np.save(path, image)
            say({"seconds": seconds})
        except Exception as exc:
            import traceback

            traceback.print_exc()
            say({"error": f"{type(exc).__name__}: {exc}"[:500]})
    return 0


# ---------------------------------------------------------------- parent side

class Worker:
    def __init__(self, python: str, subject: str, model: str, job_path: Path, threads: int, log: Any) -> None:
        self.subject = subject
        cmd = [python, str(HERE), "worker", "--subject", subject, "--model", model, "--job", str(job_path),
               "--threads", str(threads)]
        self.stderr = open(log, "a")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, env=thread_env(threads))

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"error": f"the worker exited with status {code} (see its log)"}
        return json.loads(line)

    def ask(self, text: str) -> dict[str, Any]:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            return {"error": "the worker has exited (see its log)"}
        return self.read()

    def close(self) -> dict[str, Any]:
        reply = self.ask("quit") if self.proc.poll() is None else {}
        self.proc.wait()
        self.stderr.close()
        return reply


def python_for(subject: str, args: argparse.Namespace) -> str:
    return args.optimum_python if subject in OPTIMUM_SUBJECTS else sys.executable


def run_export(subject: str, source: Path, out: Path, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """Export in a child process: wall seconds, its peak RSS (ru_maxrss via os.wait4) and the size on disk."""
    cmd = [python_for(subject, args), str(HERE), "export", "--subject", subject, "--model", str(source),
           "--out", str(out), "--height", str(args.height), "--width", str(args.width)]
    print(f"exporting {subject} ...", file=sys.stderr, flush=True)
    with open(log, "a") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, env=thread_env(max(args.threads)))
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": f"export exited with status {proc.returncode}; see {log}"}
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"export_s": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / KIB, 1),
            "disk_mib": round(size / KIB / KIB, 1), "folder": str(out)}


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, Any]]:
    if args.model:
        return Path(args.model).resolve(), {"path": str(Path(args.model).resolve())}
    if args.reuse and (args.reuse / f"random-{args.random_model}" / "model_index.json").is_file():
        path = args.reuse / f"random-{args.random_model}"
        return path, {"random_model": args.random_model, "path": str(path), "reused_from": str(args.reuse),
                      "seed": "as written by that run"}
    from sdengine.config import ModelConfig
    from sdengine.models.saving import write_random_model

    start = time.perf_counter()
    path = write_random_model(work / f"random-{args.random_model}", getattr(ModelConfig, args.random_model)(),
                              args.seed)
    return path, {"random_model": args.random_model, "seed": args.seed, "path": str(path),
                  "write_s": round(time.perf_counter() - start, 2)}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=False).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_start":
                            os.getloadavg()}
    try:
        cpu = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        info["cpu"] = cpu[0].split(":", 1)[1].strip() if cpu else None
        mem = [l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")]
        info["memory_gib"] = round(int(mem[0].split()[1]) / KIB / KIB, 1) if mem else None
    except OSError:
        pass
    return info


def measure_threads(threads: int, args: argparse.Namespace, models: dict[str, str], work: Path,
                    job_path: Path, doc: dict[str, Any], save: Any) -> None:
    run: dict[str, Any] = {"threads": threads, "subjects": {}}
    doc["runs"].append(run)
    live: dict[str, Worker] = {}
    try:
        for name in args.subjects:
            if name not in models:
                run["subjects"][name] = {"error": doc["exports"].get(name, {}).get("error", "no model")}
                continue
            print(f"[{threads} thread(s)] loading {name} ...", file=sys.stderr, flush=True)
            w = Worker(python_for(name, args), name, models[name], job_path, threads, work / f"{name}.log")
            hello = w.read()
            if "error" in hello:
                run["subjects"][name] = hello
                w.close()
                continue
            doc["versions"][name] = hello.pop("versions")
            run["subjects"][name] = {**hello, "warmup_s": [], "seconds": []}
            live[name] = w
        for round_ in range(args.warmup + args.images):
            for name, w in live.items():
                res = run["subjects"][name]
                if "error" in res:
                    continue
                path = work / f"{name}-{threads}t-{round_}.npy"
                reply = w.ask(f"image {path}")
                if "error" in reply:
                    res["error"] = reply["error"]
                    continue
                res["warmup_s" if round_ < args.warmup else "seconds"].append(round(reply["seconds"], 4))
                res["last_image"] = str(path)
                print(f"[{threads} thread(s)] {name} image {round_}: {reply['seconds']:.3f} s", file=sys.stderr,
                      flush=True)
            save()
    finally:
        for name, w in live.items():
            run["subjects"][name].update(w.close())
    compare_images(run)
    for res in run["subjects"].values():
        if res.get("seconds"):
            res.update({k: v for k, v in summarise(res["seconds"]).items() if k != "seconds"})
        res.pop("last_image", None)
    save()


def compare_images(run: dict[str, Any]) -> None:
    import numpy as np

    ref = run["subjects"].get(REFERENCE, {}).get("last_image")
    if ref is None:
        return
    reference = np.load(ref)
    for res in run["subjects"].values():
        if res.get("last_image"):
            image = np.load(res["last_image"])
            res["image_vs_reference"] = image_difference(image, reference)
            res["image_std_255"] = float(image.std() * 255)  # a flat image would make agreement meaningless


def parent(args: argparse.Namespace) -> int:
    import numpy as np

    out_dir = Path(args.out_dir)
    if any(s in OPTIMUM_SUBJECTS for s in args.subjects) and not Path(args.optimum_python).is_file():
        raise SystemExit(f"optimum-ort needs its own venv's python: {args.optimum_python} is not there; make it with "
                         f"benchmarks/optimum_env.sh (or give --optimum-python, or leave optimum-ort out of "
                         f"--subjects)")
    if REFERENCE not in args.subjects:
        raise SystemExit(f"--subjects must include {REFERENCE} (the reference of the ratios and image comparisons)")
    if args.reuse is not None and not args.reuse.is_dir():
        raise SystemExit(f"--reuse {args.reuse}: no such folder (give an earlier run's work folder)")
    work = Path(tempfile.mkdtemp(prefix="optimum-compare-", dir=args.work_dir))
    print(f"work folder (exports, logs, images): {work}", file=sys.stderr)
    doc: dict[str, Any] = {"what": "issue 18: sdengine ONNX Runtime against optimum's ORTStableDiffusionPipeline",
                           "command": [sys.executable, *sys.argv], "machine": machine(), "work_dir": str(work),
                           "settings": {k: v for k, v in vars(args).items() if k != "mode"},
                           "versions": {"sdengine_venv": versions(), "sdengine_commit": git_commit()},
                           "exports": {}, "runs": []}
    if any(s in OPTIMUM_SUBJECTS for s in args.subjects):
        doc["versions"]["optimum_venv"] = json.loads(subprocess.run(
            [args.optimum_python, str(HERE), "versions"], capture_output=True, text=True, check=True).stdout)

    def save() -> None:
        write_atomic(out_dir / "optimum_compare.json", json.dumps(doc, indent=1, default=str) + "\n")

    source, doc["model"] = prepare_model(args, work)
    rng = np.random.default_rng(args.seed)
    latents = rng.standard_normal((1, 4, args.height // 8, args.width // 8), dtype=np.float32)
    np.save(work / "latents.npy", latents)
    job = {"latents": str(work / "latents.npy"), "prompt": args.prompt, "steps": args.steps,
           "guidance": args.guidance, "height": args.height, "width": args.width}
    job_path = work / "job.json"
    write_atomic(job_path, json.dumps(job))
    models: dict[str, str] = {}
    for name in args.subjects:
        earlier = args.reuse / f"export-{name}" if args.reuse else None
        if name in EXPORTED and earlier is not None and earlier.is_dir():
            models[name] = str(earlier)
            doc["exports"][name] = {"reused_from": str(earlier), "folder": str(earlier)}
        elif name in EXPORTED:
            result = run_export(name, source, work / f"export-{name}", args, work / f"{name}-export.log")
            doc["exports"][name] = result
            if "error" not in result:
                models[name] = result["folder"]
            save()
        else:
            models[name] = str(source)
    for threads in args.threads:
        measure_threads(threads, args, models, work, job_path, doc, save)
    save()
    write_atomic(out_dir / "optimum_compare.md", table(doc))
    print(table(doc))
    print(f"written: {out_dir / 'optimum_compare.json'}, {out_dir / 'optimum_compare.md'}", file=sys.stderr)
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("--subject", required=True, choices=SUBJECTS)
    w.add_argument("--model", required=True)
    w.add_argument("--job", required=True)
    w.add_argument("--threads", type=int, required=True)
    e = sub.add_parser("export")
    e.add_argument("--subject", required=True, choices=tuple(EXPORTED))
    e.add_argument("--model", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--height", type=int, required=True)
    e.add_argument("--width", type=int, required=True)
    sub.add_parser("versions")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="a diffusers folder (SD 1.x/2.x shaped)")
    src.add_argument("--random-model", choices=("tiny", "sd15"), default=None,
                     help="random weights of this shape, written with sdengine's writer")
    p.add_argument("--subjects", nargs="+", choices=SUBJECTS,
                   default=["sdengine-ort", "optimum-ort", "diffusers", "sdengine-torch"],
                   help="add sdengine-ort-fp16 (or --fp16) for the fp16 export, sdengine-ort-int8 for --int8 matmul")
    p.add_argument("--fp16", action="store_true", help="add sdengine-ort-fp16 to --subjects")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--size", type=int, default=None, help="height and width (default 128; 64 for tiny)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=3, help="counted images per subject and thread count")
    p.add_argument("--warmup", type=int, default=1, help="uncounted rounds first")
    p.add_argument("--optimum-python", default=str(REPO / ".venv-optimum" / "bin" / "python"))
    p.add_argument("--out-dir", default="out/optimum_compare")
    p.add_argument("--work-dir", default=None, help="where exports, logs and images go (default: the temp dir)")
    p.add_argument("--reuse", type=Path, default=None, metavar="WORK_FOLDER",
                   help="an earlier run's work folder: its random model and exports are used, not remade "
                        "(their export figures are in that run's JSON)")
    args = p.parse_args(argv)
    if args.mode is None:
        if not (args.model or args.random_model):
            p.error("give --model DIFFUSERS_FOLDER or --random-model tiny|sd15")
        if args.fp16 and "sdengine-ort-fp16" not in args.subjects:
            args.subjects.append("sdengine-ort-fp16")
        size = args.size or (64 if args.random_model == "tiny" else 128)
        if size % 8 or size < 64:
            p.error(f"--size must be a multiple of 8, at least 64; got {size}")
        args.height = args.width = size
        if min(args.threads) < 1 or args.images < 1 or args.warmup < 0 or args.steps < 1:
            p.error("--threads and --images must be >= 1, --warmup >= 0, --steps >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.mode == "worker":
        return worker(args)
    if args.mode == "export":
        export_subject(args.subject, args.model, args.out, args.height, args.width)
        return 0
    if args.mode == "versions":
        print(json.dumps(versions()))
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
