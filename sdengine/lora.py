"""LoRA files read and merged into the weights with numpy: no torch here (the ONNX Runtime path uses it too).

A LoRA (Hu et al. 2021) adds a low-rank product to a weight: W' = W + scale * alpha/rank * up @ down, with
up [out, r] and down [r, in]. On a convolution (LoCon) down is [r, in, kh, kw] and up [out, r, 1, 1]; the
delta is (up.flatten(1) @ down.flatten(1)).reshape(W.shape). The merged weights replace the model's, so
generation costs what it costs without LoRAs; changing the set recomputes from the pristine base weights.

Formats (safetensors only):
- kohya / A1111: `lora_unet_<module with _ for .>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  `lora_te_<module>` for the text encoder; on SDXL `lora_te1_` / `lora_te2_` for the two text encoders and the
  U-Net's modules under either their diffusers names or the original layout's (`lora_unet_input_blocks_4_1_...`,
  as kohya's sd-scripts writes SDXL LoRAs);
- diffusers / PEFT: `unet.<module>.lora_A.weight`, `.lora_B.weight` (`text_encoder.<module>` ...); alpha is
  the rank unless a per-module `.alpha` key or diffusers' `lora_adapter_metadata` says otherwise.
Other LyCORIS kinds (LoHa, LoKr, Tucker cores, DoRA, OFT, full diffs) are recognised and refused by name.

Weights are named `unet.<parameter>`, `text_encoder.<parameter>` (and on SDXL `text_encoder_2.<parameter>`), the
reference modules' state-dict names (which are diffusers' and transformers').
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InvalidInputError, LoraError
from .files import refuse_pickle

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_PARTS = {"lora_A.weight": "down", "lora_B.weight": "up", "lora.down.weight": "down", "lora.up.weight": "up",
               "alpha": "alpha"}
# Recognised and refused: key fragment -> the kind's name.
_REFUSED = (("hada_", "LoHa (hada_*)"), ("lokr_", "LoKr (lokr_*)"), ("lora_mid", "LoCon with a Tucker core (lora_mid)"),
            ("dora_scale", "DoRA (dora_scale)"), ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
            ("oft_", "OFT (oft_*)"), ("boft_", "BOFT (boft_*)"), (".diff", "a full weight difference (.diff)"),
            (".w_norm", "a norm-layer LyCORIS (w_norm)"), (".b_norm", "a norm-layer LyCORIS (b_norm)"),
            ("ia3_", "IA3"))
_SDXL_HINTS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
               "lora_unet_middle_block_")
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16"}
_SHOWN = 8  # keys listed in an error
_MAX_HEADER = 100 * 2**20
METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT config per component


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update of the weight `target` (`unet.<parameter>` or `text_encoder.<parameter>`)."""

    target: str
    up: np.ndarray    # [out, r] or [out, r, 1, 1]
    down: np.ndarray  # [r, in] or [r, in, kh, kw]
    alpha: float      # the rank when the file names none: alpha / rank = 1

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    """A parsed LoRA file: its name (the file stem), full-file sha256 and updates."""

    path: Path
    name: str
    sha256: str
    pairs: tuple[LoraPair, ...]
    format: str  # "kohya" or "peft"

    @property
    def targets(self) -> frozenset[str]:
        return frozenset(p.target for p in self.pairs)


@dataclass(frozen=True)
class LoraInfo:
    """What an image's metadata says of one active LoRA."""

    name: str
    scale: float
    sha256: str


# ---------------------------------------------------------------- reading safetensors without torch

def read_safetensors_numpy(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], str]:
    """(tensors, metadata, sha256 of the file) of a .safetensors file, with numpy alone (bf16 -> float32)."""
    path = Path(path).expanduser()
    refuse_pickle(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path} is not a .safetensors file; LoRAs are read from safetensors only")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if not 2 <= n <= min(_MAX_HEADER, len(data) - 8):
            raise ValueError(f"header length {n} does not fit a {len(data)}-byte file")
        header = json.loads(data[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        body = memoryview(data)[8 + n:]
        tensors = {key: _tensor(key, info, body) for key, info in header.items()}
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, struct.error) as exc:
        raise LoraError(f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupt: "
                        f"download it again") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}, digest


def _tensor(key: str, info: Any, body: memoryview) -> np.ndarray:
    dtype, shape, (start, end) = _DTYPES.get(info["dtype"]), [int(s) for s in info["shape"]], info["data_offsets"]
    if dtype is None:
        raise ValueError(f"tensor {key} has dtype {info['dtype']}; a LoRA holds floating-point tensors")
    count = math.prod(shape)
    size = 2 if dtype == "bf16" else np.dtype(dtype).itemsize
    if not 0 <= start <= end <= len(body) or end - start != count * size:
        raise ValueError(f"tensor {key} has data offsets {start}..{end} that do not fit its shape {shape}")
    raw = bytes(body[start:end])
    if dtype == "bf16":  # the upper half of a float32
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<")).reshape(shape).astype(np.dtype(dtype).name)


# ---------------------------------------------------------------- keys

def module_index(targets: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """{format: {module key as a file spells it: target}} for the weights (ndim >= 2) in `targets`."""
    kohya, peft = {}, {}
    sdxl = any(name.startswith("text_encoder_2.") for name in targets)
    kohya_prefixes = {"unet": ("lora_unet_",), "text_encoder": ("lora_te1_",) if sdxl else ("lora_te_",),
                      "text_encoder_2": ("lora_te2_",)}
    original = _original_unet_modules(targets) if sdxl else {}
    for name, shape in targets.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        component, _, param = name.partition(".")
        module = param[: -len(".weight")]
        for prefix in kohya_prefixes[component]:
            kohya[prefix + module.replace(".", "_")] = name
        if component == "unet" and module in original:
            kohya["lora_unet_" + original[module].replace(".", "_")] = name
        peft[f"{component}.{module}"] = name
        if module.startswith("text_model."):  # transformers 5 saves CLIPTextModel without text_model.
            peft[f"{component}.{module[len('text_model.'):]}"] = name
    return {"kohya": kohya, "peft": peft}


def _original_unet_modules(targets: Mapping[str, Any]) -> dict[str, str]:
    """{diffusers U-Net module: the original layout's name} for the U-Net weights in `targets`, its block structure
    (levels, resnets per level, attention per level) read from the names (kohya names SDXL modules this way)."""
    from .config import UNetConfig
    from .models.convert import unet_key_map

    unet = [name[len("unet."):] for name in targets if name.startswith("unet.")]
    levels = {int(n.split(".")[1]) for n in unet if n.startswith("down_blocks.")}
    if not levels:
        return {}
    n = max(levels) + 1
    layers = len({n_.split(".")[3] for n_ in unet if n_.startswith("down_blocks.0.resnets.")})
    attention = tuple(any(m.startswith(f"down_blocks.{i}.attentions.") for m in unet) for i in range(n))
    text_time = any(m.startswith("add_embedding.") for m in unet)
    shape = UNetConfig(block_out_channels=(32,) * n, attention=attention, num_heads=(1,) * n, layers_per_block=layers,
                       addition_embed_type="text_time" if text_time else None,
                       addition_time_embed_dim=1 if text_time else None,
                       projection_class_embeddings_input_dim=7 if text_time else None)
    table = {d: o for o, d in unet_key_map(shape)}
    out = {}
    for name in unet:
        module = name.rsplit(".", 1)[0]
        head, rest = module, ""
        while head and head not in table:
            cut = head.rfind(".")
            head, rest = (head[:cut], head[cut:] + rest) if cut >= 0 else ("", "")
        if head:
            out[module] = table[head] + rest
    return out


def _refused_kind(keys: Sequence[str]) -> str | None:
    for key in keys:
        for fragment, kind in _REFUSED:
            if fragment in key:
                return kind
    return None


def _split(key: str) -> tuple[str, str, str] | None:
    """(format, module key, part) of a LoRA key, or None."""
    if key.startswith(tuple(_KOHYA_PREFIXES)):
        module, _, part = key.partition(".")
        return ("kohya", module, _KOHYA_PARTS[part]) if part in _KOHYA_PARTS else None
    if key.startswith(tuple(f"{c}." for c in COMPONENTS)):
        for suffix, part in _PEFT_PARTS.items():
            if key.endswith("." + suffix):
                return "peft", key[: -len(suffix) - 1], part
    return None


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, tuple[float | None, dict[str, float]]]:
    """{component: (lora_alpha, alpha_pattern)} from diffusers' lora_adapter_metadata, where present."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for component in COMPONENTS:
        conf = meta.get(component) if isinstance(meta.get(component), dict) else \
            {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(component + ".")}
        if conf:
            alpha = conf.get("lora_alpha")
            out[component] = (None if alpha is None else float(alpha),
                              {str(k): float(v) for k, v in (conf.get("alpha_pattern") or {}).items()})
    return out


def _metadata_alpha(module: str, rank: int, alphas: Mapping[str, tuple[float | None, dict[str, float]]]) -> float:
    component, _, name = module.partition(".")
    alpha, pattern = alphas.get(component, (None, {}))
    for key, value in pattern.items():  # PEFT matches a pattern against the module name's end
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return float(rank) if alpha is None else alpha


def read_lora(path: str | Path, targets: Mapping[str, tuple[int, ...]], strict: bool = True) -> LoraFile:
    """Parse the LoRA at `path` against the model's weights `targets` ({name: shape}).

    Keys that match no weight are an error listing the first few, unless strict=False (then skipped).
    """
    path = Path(path).expanduser()
    tensors, metadata, digest = read_safetensors_numpy(path)
    if not tensors:
        raise LoraError(f"{path} holds no tensors")
    kind = _refused_kind(list(tensors))
    if kind is not None:
        raise LoraError(f"{path} is a {kind} LyCORIS file; sdengine merges plain LoRA and LoCon "
                        f"(lora_down/lora_up, lora_A/lora_B) only: use a LoRA of that kind")
    index = module_index(targets)
    groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    unknown = []
    for key, value in tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        groups.setdefault(split[:2], {})[split[2]] = value
    formats = {fmt for fmt, _ in groups}
    if len(formats) > 1:
        raise LoraError(f"{path} mixes kohya (lora_unet_/lora_te*_) and diffusers/PEFT (lora_A/lora_B) keys; "
                        f"convert it to one of them")
    alphas = _peft_alphas(metadata)
    pairs = []
    for (fmt, module), parts in groups.items():
        target = index[fmt].get(module)
        if target is None:
            unknown.extend(f"{module}.{p}" for p in parts)
            continue
        if "up" not in parts or "down" not in parts:
            raise LoraError(f"{path}: {module} has {'no up' if 'up' not in parts else 'no down'} weight "
                            f"(lora_up/lora_B and lora_down/lora_A come in pairs); the file is incomplete")
        up, down = parts["up"], parts["down"]
        _check_shapes(path, module, up, down, targets[target])
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha = float(np.asarray(parts["alpha"], np.float64).reshape(-1)[0])
        else:
            alpha = float(rank) if fmt == "kohya" else _metadata_alpha(module, rank, alphas)
        pairs.append(LoraPair(target, up, down, alpha))
    if unknown and strict:
        sdxl_model = any(t.startswith("text_encoder_2.") for t in targets)
        hint = (" It looks made for SDXL and this model is SD 1.x/2.x: load it on an SDXL model."
                if not sdxl_model and any(k.startswith(_SDXL_HINTS) for k in unknown)
                else " Is it a LoRA for another model family? Pass strict=False to skip them.")
        raise LoraError(f"{path}: {len(unknown)} key(s) match no weight of this model: "
                        f"{', '.join(sorted(unknown)[:_SHOWN])}{' ...' if len(unknown) > _SHOWN else ''}.{hint}")
    if not pairs:
        raise LoraError(f"{path}: none of its keys is a LoRA of this model's U-Net or text encoder")
    fmt = next(iter(formats))
    return LoraFile(path, path.stem, digest, tuple(sorted(pairs, key=lambda p: p.target)), fmt)


def _check_shapes(path: Path, module: str, up: np.ndarray, down: np.ndarray, shape: tuple[int, ...]) -> None:
    rank = down.shape[0] if down.ndim >= 2 else -1
    ok = (down.ndim >= 2 and up.ndim >= 2 and up.shape[1] == rank and all(d == 1 for d in up.shape[2:])
          and up.shape[0] == shape[0] and math.prod(down.shape[1:]) == math.prod(shape[1:]))
    if not ok:
        raise LoraError(f"{path}: {module} has up {list(up.shape)} and down {list(down.shape)}, which do not make "
                        f"a delta of its weight's shape {list(shape)}: the LoRA is for another model")


# ---------------------------------------------------------------- merging

def delta(pair: LoraPair, scale: float, shape: Sequence[int]) -> np.ndarray:
    """scale * alpha/rank * up @ down, in float32, shaped as the weight."""
    r = pair.rank
    up = pair.up.reshape(pair.up.shape[0], r).astype(np.float32)
    down = pair.down.reshape(r, -1).astype(np.float32)
    factor = pair.alpha / r * float(scale)  # in double, then one float32 multiply (as PEFT's scaling)
    return ((up @ down) * np.float32(factor)).reshape(tuple(shape))


def merge(base: Mapping[str, np.ndarray], loras: Sequence[tuple[LoraFile, float]],
          only: Any = None) -> dict[str, np.ndarray]:
    """{target: float32 merged weight} for every weight a LoRA in `loras` touches, from the pristine `base`
    (restricted to the names in `only` when given: the weights one ONNX graph holds).

    The LoRAs are added in order; `base` is never modified, so the same set always gives the same bits.
    """
    merged: dict[str, np.ndarray] = {}
    for lora, scale in loras:
        for pair in lora.pairs:
            if only is not None and pair.target not in only:
                continue
            if pair.target not in merged:
                merged[pair.target] = np.array(base[pair.target], dtype=np.float32, copy=True)
            merged[pair.target] += delta(pair, scale, merged[pair.target].shape)
    return merged


def check_scale(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise InvalidInputError(f"LoRA {name}: its scale must be a finite number, got {value!r}")
    return float(value)


def lora_specs(loras: Any) -> list[tuple[Path, float]]:
    """[(path, scale)] from {path: scale} (or a list of (path, scale) pairs); None or {} is no LoRA."""
    if loras is None:
        return []
    items = list(loras.items()) if isinstance(loras, Mapping) else list(loras)
    out = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], (str, Path)):
            raise InvalidInputError(f"loras must map LoRA file paths to scales, e.g. "
                                    f"{{'style.safetensors': 0.8}}; got {item!r}")
        out.append((Path(item[0]).expanduser(), check_scale(item[1], str(item[0]))))
    names = [p.stem for p, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidInputError(f"two LoRAs are named {dupes[0]!r}: images' metadata names LoRAs by file name, "
                                f"so give each a different one")
    return out


def parse_cli_lora(text: str) -> tuple[str, float]:
    """FILE[:SCALE] (scale 1 by default) as the CLI's --lora takes it."""
    path, sep, scale = text.rpartition(":")
    if sep and path and not scale.startswith(("/", "\\")):
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0
        return path, check_scale(value, path)
    return text, 1.0
