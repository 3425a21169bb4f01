#!/usr/bin/env python3
"""Export a model to validated ONNX graphs: the same as `sdengine export` (see export/README.md).

    python export/onnx_export.py --model PATH --out DIR [--fp16] [--opset N] [--batch MIN:MAX]
                                 [--height MIN:MAX] [--width MIN:MAX] [--static] [--force]
"""

import sys

from sdengine.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
