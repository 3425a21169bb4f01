"""Step caching (DeepCache, Ma et al. 2024): a full U-Net pass every `interval` rows, shallow passes between.

The U-Net's high-level features change slowly from one denoise step to the next. A full step runs the whole
U-Net and keeps the input of one up-path layer (the "deep feature"); the next `interval - 1` steps run only
the shallow branch: conv_in, the first down layers, and the up path from that layer on, reading the cached
feature instead of everything below it.

Both parameters mean what they mean in the `deepcache` package's DeepCacheSDHelper.set_params
(cache_interval, cache_branch_id), which is the oracle the tests compare with (tests/test_step_cache.py):

- row i (one U-Net evaluation) runs the full pass when i % interval == 0 (its "uniform" mode);
- branch K names the layer pair where the shallow branch turns: block k = K // 3, layer l = K % 3. On a
  shallow row, down layer (block i, layer j) runs when i < k or (i == k and j < l) (a block's downsampler is
  layer `layers_per_block`); up layer (block m, layer n), counted from the output end as the down side is,
  runs when m < k or (m == k and n <= l) (an up block's upsampler is its layer 0); the mid block never runs.

numpy-free and torch-free: the runtime, the export and the torch modules read the same split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError, UnsupportedModelError

LAYERS_PER_BRANCH_BLOCK = 3  # DeepCacheSDHelper: cache_layer_id = branch % 3, cache_block_id = branch // 3


@dataclass(frozen=True)
class StepCache:
    """A validated request for step caching: a full step every `interval` rows, the shallow branch `branch`."""

    interval: int
    branch: int = 0

    def full(self, row: int) -> bool:
        """Whether row `row` (0-based, counted over the rows that run) runs the whole U-Net."""
        return row % self.interval == 0

    def pattern(self, rows: int) -> tuple[bool, ...]:
        """full(i) for every row: what fixes the order of a captured loop's graph launches."""
        return tuple(self.full(i) for i in range(rows))


def max_branch(unet: Any) -> int:
    """The deepest branch: the mid block's output is the cached feature."""
    return LAYERS_PER_BRANCH_BLOCK * len(unet.block_out_channels) - 1


def check_step_cache(cache_interval: Any, cache_branch: Any, unet: Any) -> StepCache | None:
    """None for no caching (interval None or 1); else the StepCache, or InvalidInputError saying what to give."""
    if cache_interval is not None and (isinstance(cache_interval, bool) or not isinstance(cache_interval, int)
                                       or cache_interval < 1):
        raise InvalidInputError(f"cache_interval must be an integer >= 1 (1: no step caching; N: a full U-Net pass "
                                f"every N steps), got {cache_interval!r}")
    top = max_branch(unet)
    if cache_branch is not None and (isinstance(cache_branch, bool) or not isinstance(cache_branch, int)
                                     or not 0 <= cache_branch <= top):
        raise InvalidInputError(f"cache_branch must be an integer in 0..{top} for this U-Net "
                                f"({len(unet.block_out_channels)} blocks; 0 caches the most), got {cache_branch!r}")
    if cache_interval is None or cache_interval == 1:
        if cache_branch is not None:
            raise InvalidInputError("cache_branch takes effect only with step caching: give cache_interval >= 2 too")
        return None
    return StepCache(int(cache_interval), 0 if cache_branch is None else int(cache_branch))


@dataclass(frozen=True)
class CacheSplit:
    """Where the shallow pass of `branch` cuts the U-Net.

    down_ops: down layers run after conv_in (each leaves one skip); up_start: index of the first up-path op
    run (ops in execution order: each block's resnet(+attention) layers, then its upsampler), whose input is
    the cached feature; channels and level: the feature has `channels` channels at the latent size halved
    (rounding up, as the stride-2 convolutions do) `level` times.
    """

    branch: int
    down_ops: int
    up_start: int
    channels: int
    level: int

    def side(self, latent_side: int) -> int:
        for _ in range(self.level):
            latent_side = (latent_side + 1) // 2
        return latent_side

    def feature_shape(self, rows: int, latent_height: int, latent_width: int) -> tuple[int, int, int, int]:
        """[R, C, h, w] of the cached feature for R U-Net rows (2B with guidance) at a latent size."""
        return (rows, self.channels, self.side(latent_height), self.side(latent_width))


def cache_split(unet: Any, branch: int) -> CacheSplit:
    """The shallow pass of DeepCacheSDHelper's branch `branch` on a U-Net config (UNetConfig)."""
    chs, layers = tuple(unet.block_out_channels), int(unet.layers_per_block)
    n = len(chs)
    if not 0 <= branch <= max_branch(unet):
        raise InvalidInputError(f"cache_branch must be in 0..{max_branch(unet)} for this U-Net, got {branch}")
    k, first = divmod(branch, LAYERS_PER_BRANCH_BLOCK)
    helper_down = sum(1 for i in range(n) for j in range(layers + (1 if i < n - 1 else 0))
                      if i < k or (i == k and j < first))
    up = []  # (block counted from the output end, layer counted from the output end, is a resnet layer)
    for i in range(n):
        m = n - 1 - i
        up += [(m, layers - j, True) for j in range(layers + 1)]
        if i < n - 1:
            up.append((m, 0, False))
    runs = [m < k or (m == k and layer <= first) for m, layer, _ in up]
    start = runs.index(True)
    if not all(runs[start:]):
        raise UnsupportedModelError(f"cache_branch {branch}: the shallow layers are not one tail of the up path")
    skips = sum(1 for _, _, resnet in up[start:] if resnet)
    if skips - 1 > helper_down:  # the helper would read skips it did not recompute: not a layout it was made for
        raise UnsupportedModelError(f"cache_branch {branch} does not fit this U-Net's {layers} layers per block; "
                                    f"choose another branch")
    if start == 0:
        channels, level = chs[-1], n - 1  # the mid block's output
    else:
        m, _, resnet = up[start - 1]
        channels, level = chs[m], m if resnet else m - 1
    return CacheSplit(branch, skips - 1, start, channels, level)
