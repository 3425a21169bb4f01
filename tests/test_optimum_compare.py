"""benchmarks/optimum_compare.py's report code (ratios, table, image difference) and its argument checks.

The comparison itself needs optimum's own venv (benchmarks/optimum_env.sh) and minutes of CPU: it is run
by hand (benchmarks/NOTES.md, "optimum comparison"); nothing here starts it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "optimum_compare.py"


@pytest.fixture(scope="module")
def oc():
    spec = importlib.util.spec_from_file_location("optimum_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_with(runs):
    return {"settings": {"subjects": ["sdengine-ort", "optimum-ort", "diffusers"]}, "runs": runs,
            "exports": {"sdengine-ort": {"export_s": 11.04, "peak_rss_mib": 540.2},
                        "optimum-ort": {"error": "export exited with status 1"}}}


def test_table_ratios_against_sdengine_ort_and_missing_figures(oc):
    diff = {"max_abs_255": 0.5, "mean_abs_255": 0.01}
    runs = [{"threads": 1, "subjects": {
                "sdengine-ort": {"median_s": 2.0, "load_s": 1.5, "load_peak_mib": 140, "peak_rss_mib": 150,
                                 "image_vs_reference": {"max_abs_255": 0.0, "mean_abs_255": 0.0}},
                "optimum-ort": {"median_s": 3.0, "load_s": 8.0, "load_peak_mib": 540, "peak_rss_mib": 550,
                                "image_vs_reference": diff},
                "diffusers": {"error": "ImportError: no diffusers"}}},
            {"threads": 2, "subjects": {"sdengine-ort": {"median_s": 1.0}, "optimum-ort": {"median_s": 1.25},
                                        "diffusers": {"median_s": 4.0}}}]
    lines = oc.table(doc_with(runs)).splitlines()
    assert lines[0].startswith("| subject | 1 thread: s/image (ratio) | 2 threads: s/image (ratio) |")
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:5]}
    assert rows["sdengine-ort"][1:3] == ["2.000 (1.00)", "1.000 (1.00)"]
    assert rows["optimum-ort"][1:3] == ["3.000 (1.50)", "1.250 (1.25)"]
    assert rows["diffusers"][1:3] == ["error", "4.000 (4.00)"]
    assert rows["sdengine-ort"][6] == "11.0" and rows["optimum-ort"][6] == "error"
    assert rows["optimum-ort"][3] == "8.00 / -" and rows["optimum-ort"][-1] == "max 0.5, mean 0.01 / - |"


def test_ratio_and_image_difference(oc):
    assert oc.ratio(3.0, 2.0) == 1.5
    assert oc.ratio(None, 2.0) is None and oc.ratio(1.0, None) is None and oc.ratio(1.0, 0) is None
    a = np.zeros((4, 4, 3), np.float32)
    b = a.copy()
    b[0, 0, 0] = 2 / 255
    d = oc.image_difference(b, a)
    assert d["max_abs_255"] == pytest.approx(2.0) and d["mean_abs_255"] == pytest.approx(2.0 / 48)
    with pytest.raises(ValueError, match="shapes differ"):
        oc.image_difference(a[:2], a)
    summary = oc.summarise([3.0, 1.0, 2.0])
    assert summary["median_s"] == 2.0 and summary["min_s"] == 1.0


def test_arguments(oc):
    args = oc.parse(["--random-model", "tiny", "--fp16", "--threads", "1"])
    assert args.height == args.width == 64 and "sdengine-ort-fp16" in args.subjects
    assert oc.parse(["--random-model", "sd15"]).height == 128
    with pytest.raises(SystemExit):
        oc.parse(["--threads", "1"])  # no model
    with pytest.raises(SystemExit):
        oc.parse(["--random-model", "tiny", "--size", "60"])


def test_module_imports_with_the_standard_library_only():
    """The optimum venv runs the same file without sdengine: its module level must not import either."""
    code = (f"import importlib.util, sys; s = importlib.util.spec_from_file_location('oc', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "print(sorted(n for n in ('numpy', 'sdengine', 'torch', 'onnxruntime') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
