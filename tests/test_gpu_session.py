"""The prepared GPU session's own machinery on the CPU (issue 17): the session script streams and snapshots, children
die with their parent, the fast-path budget counts only parts that will run, the results file's fields, and what
the diffusers anchor compiles. Nothing here needs a GPU; what only a GPU can show waits for the device run."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield {n: importlib.import_module(n) for n in ("procs", "gpu_fastpath", "gpu_results")}
    finally:
        sys.path.remove(str(BENCH))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# --- item 4: a killed parent kills its children's process groups ---------------------------------------------

PARENT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {bench!r})
    import procs
    child = procs.start([sys.executable, "-c", "import subprocess, sys, time; "
                         "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
                         "print(g.pid, flush=True); time.sleep(120)"], stdout=open({pids!r}, "w"))
    print(child.pid, flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("how", ["sigterm", "exit"])
def test_a_killed_or_ending_parent_kills_the_childs_group(tmp_path, how):
    pids = tmp_path / "grandchild.txt"
    code = PARENT.format(bench=str(BENCH), pids=str(pids))
    if how == "exit":  # a parent that ends normally (an exception, the end of main) leaves no child either
        code = code.replace("time.sleep(120)\n", "time.sleep(1.5)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    for _ in range(100):
        if pids.exists() and pids.read_text().strip():
            break
        time.sleep(0.1)
    grandchild = int(pids.read_text())
    assert os.getpgid(child) == child != os.getpgid(parent.pid)  # its own session, as the parts' children are
    assert _alive(child) and _alive(grandchild)
    if how == "sigterm":
        parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == (128 + signal.SIGTERM if how == "sigterm" else 0)
    for _ in range(50):
        if not _alive(child) and not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(child) and not _alive(grandchild)


def test_wait_kills_a_part_past_its_limit(bench):
    procs = bench["procs"]
    proc = procs.start([sys.executable, "-c", "import time; time.sleep(60)"])
    start = time.monotonic()
    assert procs.wait(proc, 0.5) == "timeout" and time.monotonic() - start < 10 and not _alive(proc.pid)
    assert procs.wait(procs.start([sys.executable, "-c", "raise SystemExit(3)"]), 30) == 3


# --- item 1: the fast-path budget -------------------------------------------------------------------------------


def test_reserves_count_only_the_parts_that_will_run(bench):
    fp = bench["gpu_fastpath"]
    parts = list(fp.PARTS)
    without = fp.runnable(parts, has_diffusers=False)
    assert "diffusers-eager" not in without and "diffusers-compiled" not in without
    # without diffusers nothing after ours-compiled is promised time: it gets its whole cap
    plan = fp.groups(without)
    assert ("ours-compiled",) in plan
    assert fp.slot_for(("ours-compiled",), ["ours-graph", "throughput"], 400, False) == fp.CAP_S["ours-compiled"]
    # with diffusers the two compiled parts run as one group, and the eager row is promised its time before them
    plan = fp.groups(fp.runnable(parts, has_diffusers=True))
    assert plan[:3] == [("prepare",), ("diffusers-eager",), ("ours-compiled", "diffusers-compiled")]
    assert fp.groups(parts, concurrent=False)[2] == ("ours-compiled",)
    assert fp.slot_for(("prepare",), ["diffusers-eager", "ours-compiled", "diffusers-compiled"], 280, False) == 90
    assert fp.slot_for(("diffusers-eager",), ["ours-compiled", "diffusers-compiled"], 245, False) == 60
    # a group of the decisive plan's size fits: about 210 s for both compiles after prepare and the eager row
    pair = fp.slot_for(("ours-compiled", "diffusers-compiled"), [], 280 - 35 - 35, False)
    assert pair == 210 and pair >= fp.EST_S["ours-compiled"]


def test_the_decisive_plan_fits_its_400_seconds(bench):
    import gpu_check

    fp = bench["gpu_fastpath"]
    check = sum(gpu_check.PART_SECONDS[p] for p in ("buffers", "tiny", "sd15"))
    script = (BENCH / "gpu_session.sh").read_text()
    assert "PLAN_S=${PLAN_S:-400}" in script and "CHECK_S=${CHECK_S:-95}" in script
    assert 'run(command="bash benchmarks/gpu_session.sh", timeout_s=420, carry=[".whl"])' in script
    fast = sum(fp.EST_S[p] for p in ("prepare", "diffusers-eager")) + max(fp.EST_S["ours-compiled"],
                                                                         fp.EST_S["diffusers-compiled"])
    assert 10 + 95 + fast + 15 <= 400 < 420  # setup, check, fast path, last snapshot; the timeout's margin
    assert check >= 95  # the check's parts can use all of CHECK_S


def test_gpu_turn_waits_for_a_started_peer_then_takes_the_lock(bench, tmp_path):
    import threading

    P = importlib.import_module("gpu_fastpath_parts")
    def part(name):  # the fields gpu_turn uses, without Part's model setup
        p = P.Part.__new__(P.Part)
        p.name, p.work, p.results, p.deadline = name, tmp_path, tmp_path / "r.jsonl", time.time() + 60
        (tmp_path / "sync").mkdir(exist_ok=True)
        (tmp_path / "sync" / f"started-{name}").touch()  # as Part.__init__ marks it
        return p

    a, b = part("ours-compiled"), part("diffusers-compiled")  # both started: each waits for the other to compile
    order = []

    def first():
        with a.gpu_turn(poll=0.05):
            order.append("a-in")
            time.sleep(0.3)
            order.append("a-out")

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.3)
    assert order == []  # a waits: b has started and not compiled yet
    with b.gpu_turn(poll=0.05):
        order.append("b-in")
    t.join()
    assert order in (["a-in", "a-out", "b-in"], ["b-in", "a-in", "a-out"])
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted((r["part"], tuple(r["peers"])) for r in rows if r["kind"] == "gpu-turn") == [
        ("diffusers-compiled", ("ours-compiled",)), ("ours-compiled", ("diffusers-compiled",))]


# --- item 10: what the diffusers anchor compiles ------------------------------------------------------------


def test_diffusers_compile_follows_the_speed_guide_and_says_what_it_left_out(bench):
    import torch
    from torch import nn

    P = importlib.import_module("gpu_fastpath_parts")

    class Vae(nn.Conv2d):
        def decode(self, x):
            return self(x)

    class Pipe:
        def __init__(self):
            self.unet, self.vae, self.fused = nn.Conv2d(4, 4, 1), Vae(4, 3, 1), False

        def fuse_qkv_projections(self):
            self.fused = True

    pipe = Pipe()
    how = P.compile_diffusers(pipe, fullgraph=True, backend="eager")
    assert pipe.fused and how["fused_qkv"] is True
    assert how["torch_compile"]["targets"] == ["unet", "vae.decode"] and how["channels_last"] == ["unet", "vae"]
    assert pipe.vae.weight.is_contiguous(memory_format=torch.channels_last)
    assert hasattr(pipe.unet, "_orig_mod") and pipe.vae.decode is not Vae.decode
    assert {"mode max-autotune", "coordinate_descent_tuning", "bfloat16"} <= set(how["left_out"])
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(pipe.vae.decode(x), nn.functional.conv2d(x, pipe.vae.weight, pipe.vae.bias))
    eager = P.diffusers_eager_config()
    assert eager["channels_last"] is None and eager["torch_compile"] is None  # the eager row stays NCHW


# --- results-gpu.json ---------------------------------------------------------------------------------------


def _fake_results(check: Path, fast: Path) -> None:
    check.mkdir(parents=True, exist_ok=True)
    fast.mkdir(parents=True, exist_ok=True)
    case = {"graph_vs_eager": {"identical": True}, "cached_graph_new_inputs_vs_eager": {"identical": True},
            "image_vs_cpu_fp32": {"max_255": 2}}
    files = {"env": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "modules": {"cuda.bindings": "13.0.1"}},
             "buffers": {"ok": True, "leaked_bytes": 0}, "tiny": {"ok": True, "cases": [case, case]},
             "sd15": {"ok": True, "graph_vs_eager": {"identical": True}, "eager_step_ms_median": 30.0,
                      "graph_step_ms": 25.0}}
    for name, data in files.items():
        (check / f"{name}.json").write_text(json.dumps(data))
    (check / "nvidia-smi.txt").write_text("NVIDIA H200, 580.159.04, 143771 MiB\n")
    rows = [{"part": "prepare", "kind": "env", "steps": 50, "gpu": "NVIDIA H200", "driver": "580.159.04"},
            {"kind": "timing", "variant": "diffusers-eager", "batch": 1, "median_s": 2.0, "images_per_s": 0.5,
             "config": {"torch_compile": None}},
            {"kind": "timing", "variant": "ours-compiled", "batch": 1, "median_s": 1.0, "images_per_s": 1.0,
             "config": {"torch_compile": {"mode": "default"}}},
            {"kind": "stages", "variant": "ours-compiled", "denoise_s": 0.9},
            {"part": "diffusers-compiled", "kind": "part-end", "rc": "timeout", "wall_s": 215, "slot_s": 210}]
    (fast / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"cut short")


def test_results_file_has_every_field_and_says_why_one_is_missing(bench, tmp_path):
    gr = bench["gpu_results"]
    _fake_results(tmp_path / "check", tmp_path / "fast")
    out = tmp_path / "results-gpu.json"
    assert gr.main(["--check", str(tmp_path / "check"), "--fast", str(tmp_path / "fast"), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for field in ("device", "driver", "torch", "cuda_bindings", "graph_replay_equal", "fp16_vs_fp32_max_diff_255",
                  "unet_step_ms", "e2e_s", "images_per_s", "reasons"):
        assert field in r
    assert r["device"] == "NVIDIA H200" and r["driver"] == "580.159.04" and r["cuda_bindings"] == "13.0.1"
    assert r["graph_replay_equal"] == {"tiny": True, "sd15_shaped": True}
    assert r["fp16_vs_fp32_max_diff_255"] == 2 and r["fp16_vs_fp32_within_2_255"] is True and r["runtime_no_leak"]
    assert r["unet_step_ms"] == {"eager": 30.0, "whole_loop_graph": 25.0, "compiled_graph": 18.0}
    assert r["e2e_s"] == {"ours_fastest": 1.0, "diffusers_compiled": None, "diffusers_eager": 2.0}
    assert "timeout" in r["reasons"]["e2e_s.diffusers_compiled"] and r["partial"] is True
    assert r["images_per_s"]["ours"] == {"1": 1.0, "2": None, "4": None, "8": None}
    assert "followup" in r["reasons"]["images_per_s.ours.2"]
    assert r["configs"]["ours-compiled"] == {"torch_compile": {"mode": "default"}}
    empty = gr.collect(tmp_path / "none", tmp_path / "none", final=True)
    assert empty["device"] is None and "device" in empty["reasons"] and empty["partial"] is False


# --- item 2: the session script streams its output and snapshots into $OUT ----------------------------------

STAND_IN = textwrap.dedent("""\
    #!{python}
    # A stand-in for python3 on the device: the two GPU scripts write a little, slowly; anything else runs for real.
    import json, os, pathlib, sys, time
    args = sys.argv[1:]
    if args and args[0] in ("benchmarks/gpu_check.py", "benchmarks/gpu_fastpath.py"):
        out = pathlib.Path(args[args.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out.parent / "stand-in.pid").write_text(str(os.getpid()))
        if args[0].endswith("gpu_check.py"):
            (out / "env.json").write_text(json.dumps({{"gpu": "Stand-in GPU", "modules": {{}}}}))
            print("check: env written", flush=True)
            time.sleep({pause})
            print("check: done", flush=True)
        else:
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps({{"kind": "timing", "variant": "diffusers-eager", "batch": 1, "median_s": 2.0,
                                    "images_per_s": 0.5}}) + "\\n")
            print("fast: a timing row written", flush=True)
            time.sleep({pause})
        sys.exit(0)
    import os
    os.execv({python!r}, [{python!r}] + args)
""")


def _session(tmp_path: Path, pause: float, **env: str) -> subprocess.Popen:
    fake = tmp_path / "python3"
    fake.write_text(STAND_IN.format(python=sys.executable, pause=pause))
    fake.chmod(0o755)
    full = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PY=str(fake), SNAP_S="1",
                PLAN_S="120", **env)
    return subprocess.Popen(["bash", str(BENCH / "gpu_session.sh")], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_session_streams_and_snapshots_while_it_runs(tmp_path):
    proc = _session(tmp_path, pause=4)
    out = tmp_path / "out"
    seen_partial = None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if (out / "results-gpu.json").exists() and (out / "gpu-results.tgz").exists():
            r = json.loads((out / "results-gpu.json").read_text())
            if r["partial"] and r["device"] == "Stand-in GPU":
                seen_partial = r
                log = (out / "session.log").read_text()
                break
        time.sleep(0.2)
    assert seen_partial is not None and proc.poll() is None  # partial files in $OUT while the run goes on
    assert "check: env written" in log  # the output reached $OUT as it was printed
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert "check: done" in stdout and "fast: a timing row written" in stdout  # ... and standard output too
    final = json.loads((out / "results-gpu.json").read_text())
    assert final["partial"] is False and final["e2e_s"]["diffusers_eager"] == 2.0
    with tarfile.open(out / "gpu-results.tgz") as tar:
        names = tar.getnames()
    assert "check/env.json" in names and "fast/results.jsonl" in names
    assert sorted(p.name for p in out.iterdir()) == ["gpu-results.tgz", "results-gpu.json", "session.log"]


def test_a_killed_session_leaves_its_results(tmp_path):
    proc = _session(tmp_path, pause=30)
    out = tmp_path / "out"
    deadline = time.monotonic() + 30
    while not (out / "session.log").exists() or "check: env written" not in (out / "session.log").read_text():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    stand_in = int((tmp_path / "work" / "stand-in.pid").read_text())
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)  # as a shell's timeout does
    proc.communicate(timeout=60)
    assert time.monotonic() - start < 20  # not after the phase's 30 s: the running phase was stopped
    r = json.loads((out / "results-gpu.json").read_text())
    assert r["device"] == "Stand-in GPU" and (out / "gpu-results.tgz").exists()
    for _ in range(50):
        if not _alive(stand_in):
            break
        time.sleep(0.1)
    assert not _alive(stand_in)  # the phase's process did not outlive the session
