"""Peak host memory of loading a full-size SDXL base single file (fp16, Stability's layout) on the torch backend.

Writes the file tensor by tensor (zeros; the shapes of SDXL base 1.0, taken from meta tensors, so the writer never
holds the model), then loads it in a fresh process with dtype float16 and reports that process's peak resident
memory (ru_maxrss). The U-Net alone is 2.57 B parameters (5.1 GB in fp16): a loader that kept the file's tensors
and a separately built U-Net would peak above 6.9 + 5.1 GB.

    PYTHONPATH=. python benchmarks/sdxl_load_memory.py [--file /tmp/sdxl-base.safetensors] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

LOADER = r"""
import resource, sys, time
import torch
from sdengine.models.loading import load_components
t = time.perf_counter()
c = load_components(sys.argv[1], dtype=torch.float16)
seconds = time.perf_counter() - t
params = sum(p.numel() for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2) for p in m.parameters())
print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} {params} {seconds:.1f} {c.config.sdxl}")
"""


def write_file(path: Path) -> int:
    """SDXL base's original-layout keys and shapes as a zero-filled fp16 .safetensors, written in a stream."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdengine.config import ModelConfig
    from sdengine.models.convert import diffusers_to_original

    cfg = ModelConfig.sdxl_base()

    def kwargs(c):
        d = c.to_diffusers()
        d.pop("_class_name")
        return d

    def prefixed(sd):
        return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                for k, v in sd.items() if not k.endswith("position_ids")}

    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel(**kwargs(cfg.unet)).state_dict(),
                 "vae": AutoencoderKL(**kwargs(cfg.vae)).state_dict(),
                 "text_encoder": prefixed(CLIPTextModel(cfg.text_encoder.to_transformers()).state_dict()),
                 "text_encoder_2": prefixed(CLIPTextModelWithProjection(
                     cfg.text_encoder_2.to_transformers()).state_dict())}
    shapes = {k: tuple(v.shape) for k, v in diffusers_to_original(parts, cfg, "sdxl").items()}
    header, offset = {}, 0
    for key in sorted(shapes):
        n = 2
        for d in shapes[key]:
            n *= d
        header[key] = {"dtype": "F16", "shape": list(shapes[key]), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".partial")
    chunk = bytes(64 << 20)
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        left = offset
        while left:
            f.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    os.replace(tmp, path)
    return offset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=Path("/tmp/sdxl-base-zeros.safetensors"))
    parser.add_argument("--keep", action="store_true", help="keep the written file")
    args = parser.parse_args()
    size = args.file.stat().st_size if args.file.exists() else write_file(args.file)
    try:
        out = subprocess.run([sys.executable, "-c", LOADER, str(args.file)], capture_output=True, text=True,
                             check=True).stdout.split()
    finally:
        if not args.keep:
            args.file.unlink(missing_ok=True)
    peak, params, seconds, sdxl = out[-4:]
    print(json.dumps({"file_gb": round(size / 1e9, 2), "parameters": int(params), "peak_rss_gib": float(peak),
                      "load_seconds": float(seconds), "sdxl": sdxl == "True"}))


if __name__ == "__main__":
    main()
