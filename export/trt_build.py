#!/usr/bin/env python3
"""Build TensorRT engines from an fp16 ONNX export: the same as `sdengine build` (needs TensorRT and a GPU).

    python export/trt_build.py --onnx DIR --out engines/NAME [--static | --batch MIN:OPT:MAX
                               --height MIN:OPT:MAX --width MIN:OPT:MAX] [--timing-cache FILE]
                               [--workspace-gb N] [--opt-level N] [--refittable] [--verbose]
"""

import sys

from sdengine.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
