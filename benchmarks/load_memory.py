"""Peak host memory of loading a diffusers folder on the torch backend, against the size of its weights.

Each case loads `sdengine.load_pipeline(MODEL, backend="torch", dtype=...)` in a fresh process and reports:
the resident size after importing torch, transformers' CLIP and sdengine (the baseline), the peak resident
size of the load (VmHWM, reset through /proc/self/clear_refs after the imports), the resident size after it
split into anonymous and file-backed pages (RssAnon, RssFile: memory-mapped weights count as file pages),
the bytes of the loaded parameters and buffers, and the process's ru_maxrss (os.wait4). With --run it then
generates one 64x64 image in one step, which reads every weight, and reports the peak again.

Cases: `fp32` (the fp32 files at dtype float32), `fp16-cast` (the fp32 files at dtype float16) and
`fp16-file` (an fp16 copy of the folder, --fp16-model, written once from MODEL with --write-fp16).

    PYTHONPATH=. python benchmarks/load_memory.py --model /tmp/sd15-random [--write-random sd15] \
        [--fp16-model /tmp/sd15-random-fp16 --write-fp16] [--cases fp32 fp16-cast fp16-file] [--run] [--json OUT]

SD 1.5-shaped folders take more than 6 GiB to write: on a shared machine run under the big-memory lock.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
MIB = 1 << 20
CASES = {"fp32": ("model", "float32"), "fp16-cast": ("model", "float16"), "fp16-file": ("fp16_model", "float16")}


def status_kib(field: str) -> int | None:
    """A `field: N kB` line of /proc/self/status (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def resident() -> dict[str, float | None]:
    """Peak and current resident MiB of this process, the current split into anonymous and file pages."""
    return {k: (None if (v := status_kib(f)) is None else round(v / 1024, 1))
            for k, f in (("peak_mib", "VmHWM"), ("rss_mib", "VmRSS"), ("anon_mib", "RssAnon"),
                         ("file_mib", "RssFile"))}


def child(model: str, dtype: str, run: bool, threads: int) -> dict[str, Any]:
    """Load (and with `run` use) the pipeline in this process; the figures as a dict."""
    import torch
    import transformers.models.clip.modeling_clip  # noqa: F401  (code, not weights: part of the baseline)

    import sdengine
    import sdengine.backends.torch_backend  # noqa: F401
    from sdengine.bench.memory import HostPeak

    torch.set_num_threads(threads)
    out: dict[str, Any] = {"baseline": resident()}
    host = HostPeak()
    host.reset()
    start = time.perf_counter()
    pipe = sdengine.load_pipeline(model, backend="torch", dtype=getattr(torch, dtype))
    out["load_s"] = round(time.perf_counter() - start, 2)
    out["after_load"] = resident()
    out["peak_method"] = host.method
    c = pipe.backend.components
    modules = [m for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2) if m is not None]
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    out["weights_mib"] = round(sum(t.numel() * t.element_size() for t in tensors) / MIB, 1)
    out["dtypes"] = sorted({str(t.dtype) for t in tensors if t.is_floating_point()})
    if run:
        start = time.perf_counter()
        pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, seed=0, output_type="np")
        out["run_s"] = round(time.perf_counter() - start, 2)
        out["after_run"] = resident()
    return out


def child_env(threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads),
                PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def measure(model: Path, dtype: str, run: bool, threads: int) -> dict[str, Any]:
    """One case in a fresh process; its figures and ru_maxrss."""
    cmd = [sys.executable, str(HERE), "child", "--model", str(model), "--dtype", dtype, "--threads", str(threads)]
    cmd += ["--run"] if run else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=child_env(threads))
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        return {"error": f"the child exited with status {code}"}
    result = json.loads(text.strip().splitlines()[-1])
    result["ru_maxrss_mib"] = round(usage.ru_maxrss / 1024, 1)
    return result


def folder_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*.safetensors")) / MIB, 1)


def write_fp16(source: Path, out: Path) -> None:
    """An fp16 copy of a diffusers folder (the same layout, each tensor cast)."""
    import torch

    from sdengine.models.loading import load_components
    from sdengine.models.saving import save_diffusers_folder

    c = load_components(source, dtype=torch.float16)
    save_diffusers_folder(out, c.config, c.unet, c.vae, c.text_encoder, dtype=torch.float16,
                          text_encoder_2=c.text_encoder_2)


def report(rows: list[tuple[str, Path, dict[str, Any]]]) -> str:
    head = ["case", "files MiB", "weights MiB", "baseline MiB", "load peak MiB", "(peak - baseline) / weights",
            "after load anon / file MiB", "load s", "run peak MiB", "after run anon / file MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for case, folder, r in rows:
        if "error" in r:
            lines.append(f"| {case} | {r['error']} |")
            continue
        base, load, w = r["baseline"]["rss_mib"], r["after_load"], r["weights_mib"]
        run = r.get("after_run", {})
        lines.append("| " + " | ".join(str(x) for x in (
            case, folder_mib(folder), w, base, load["peak_mib"], f"{(load['peak_mib'] - base) / w:.2f}",
            f"{load['anon_mib']} / {load['file_mib']}", r["load_s"], run.get("peak_mib", "-"),
            f"{run['anon_mib']} / {run['file_mib']}" if run else "-")) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    c = sub.add_parser("child")
    c.add_argument("--model", required=True)
    c.add_argument("--dtype", required=True)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--run", action="store_true")
    w = sub.add_parser("write")
    w.add_argument("--out", type=Path, required=True)
    w.add_argument("--config")
    w.add_argument("--fp16-of", type=Path)
    parser.add_argument("--model", type=Path, default=Path("/tmp/sd15-random"))
    parser.add_argument("--write-random", metavar="CONFIG", help="write a random model of this ModelConfig factory "
                        "(sd15, tiny, ...) at --model first, unless it exists")
    parser.add_argument("--fp16-model", type=Path, help="an fp16 copy of --model (case fp16-file)")
    parser.add_argument("--write-fp16", action="store_true", help="write --fp16-model from --model first")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["fp32", "fp16-cast"])
    parser.add_argument("--run", action="store_true", help="then generate one 64x64 image in one step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    if args.command == "child":
        print(json.dumps(child(args.model, args.dtype, args.run, args.threads)))
        return 0
    if args.command == "write":
        if args.fp16_of:
            write_fp16(args.fp16_of, args.out)
        else:
            from sdengine.config import ModelConfig
            from sdengine.models.saving import write_random_model

            write_random_model(args.out, getattr(ModelConfig, args.config)(), seed=0)
        return 0
    # Written in child processes: a parent's resident size before fork and exec counts in its children's ru_maxrss.
    if args.write_random and not (args.model / "model_index.json").is_file():
        subprocess.run([sys.executable, str(HERE), "write", "--config", args.write_random, "--out", str(args.model)],
                       check=True, env=child_env(1))
    if args.write_fp16 and args.fp16_model and not (args.fp16_model / "model_index.json").is_file():
        subprocess.run([sys.executable, str(HERE), "write", "--fp16-of", str(args.model), "--out",
                        str(args.fp16_model)], check=True, env=child_env(1))
    rows = []
    for case in args.cases:
        folder = getattr(args, CASES[case][0])
        if folder is None:
            parser.error(f"case {case} needs --fp16-model")
        result = measure(folder, CASES[case][1], args.run, args.threads)
        print(case, json.dumps(result), file=sys.stderr, flush=True)
        rows.append((case, folder, result))
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps({"load_avg": os.getloadavg(), "cases": {c: r for c, _, r in rows},
                                         "command": sys.argv}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
