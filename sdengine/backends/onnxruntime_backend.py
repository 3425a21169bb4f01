"""The ONNX Runtime backend over an exported folder (sdengine export): no torch anywhere on this path.

The denoise loop runs the denoise-step graph N times through IO binding: the latent ping-pongs between
two buffers allocated once per shape, and each step binds its own row of the timestep, coefficient
and noise arrays, uploaded once per call. Nothing crosses back to the host inside the loop.

Guidance 1 (the pipeline then sends only the B conditional rows): the rows are duplicated into the
same step graph; m_u = m_c makes m = m_u + 1 (m_c - m_u) = m_c. One graph and one code path for
every export (static ones included), no host round trip, at the cost of a second U-Net pass; a loop
of your own can run the plain `unet` graph instead.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .. import lora as sdlora
from ..errors import InvalidInputError, LoraError, ModelLoadError
from ..manifest import META_GRAPH, META_INT8, META_SOURCE, TOKENIZER_2_DIR, TOKENIZER_DIR, Manifest
from ..runtime.onnx_files import read_initializers, with_initializers
from ..runtime.onnxruntime import TENSORRT, Buffer, BufferView, Graph, resolve_providers, tensorrt_options
from ..samplers.table import Schedule, fit_slots
from ..specs import DEEP_FEATURE, DENOISE_STEP, DENOISE_STEP_FULL, DENOISE_STEP_SHALLOW, TEXT_ENCODER, TEXT_ENCODER_2, \
    VAE_DECODER, VAE_ENCODER, Precision, check_dim, dim_ranges, graph_specs, point_dims, profile, spec_of
from ..stepcache import StepCache, cache_split
from ..tokenizer import ClipTokenizer
from . import AddedConditioning, ImageCondition, StepCallback, reject_unknown_options

log = logging.getLogger("sdengine")

_SESSIONS = (TEXT_ENCODER, DENOISE_STEP, VAE_DECODER)  # what txt2img runs, opened at load
_CHECKED = (*_SESSIONS, VAE_ENCODER)  # checked at load (image inputs open the encoder); the plain U-Net is unused
_LORA_GRAPHS = (TEXT_ENCODER, DENOISE_STEP)  # the sessions holding weights a LoRA changes
_REEXPORT = "re-export with sdengine export --batch/--height/--width MIN:MAX covering it"
_REEXPORT_SLOTS = "re-export with sdengine export --state-slots {slots} (the default, 4, runs every sampler)"
_REEXPORT_CHUNKS = ("re-export with sdengine export --max-prompt-chunks {chunks} or more (the default, 8, reads every "
                    "prompt)")


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
    """Text encoder output on the device: `rows` valid rows of `buffer`."""

    buffer: Buffer
    rows: int


class OnnxRuntimeBackend:
    """encode_text / denoise / decode over ONNX Runtime sessions created once."""

    def __init__(self, manifest: Manifest, device: str, providers: Sequence[str], threads: int | None,
                 prediction_type: str | None = None, spinning: bool = True) -> None:
        self.manifest, self.device, self.providers = manifest, device, list(providers)
        if manifest.precision is Precision.FP16 and device != "cuda":
            log.warning("%s is an fp16 export: fp16 is for GPUs; ONNX Runtime's CPU provider runs it slower than "
                        "fp32 and holds more memory (benchmarks/RESULTS.md); for CPU serving export without --fp16",
                        manifest.folder)
        self.config = config = manifest.config.with_prediction_type(prediction_type)  # the graphs stay valid
        self.ranges, self.dims = manifest.ranges, dim_ranges(config, manifest.ranges)
        self.tokenizer = ClipTokenizer.from_folder(manifest.folder / TOKENIZER_DIR)
        self.specs = graph_specs(config)  # SDXL: two text encoders, the step with text_embeds and time_ids
        self.tokenizer_2 = ClipTokenizer.from_folder(manifest.folder / TOKENIZER_2_DIR) if config.sdxl else None
        self._lora_graphs = _LORA_GRAPHS + ((TEXT_ENCODER_2,) if config.sdxl else ())
        checked = _CHECKED + ((TEXT_ENCODER_2,) if config.sdxl else ())
        self.int8 = manifest.int8(DENOISE_STEP)  # the step's --int8 op set, or None
        if self.int8 and device != "cpu":
            raise InvalidInputError(f"{manifest.folder} holds an int8 U-Net (sdengine export --int8), a CPU path: run "
                                    f"it with --device cpu, or export without --int8 for the GPU")
        self._paths = {name: manifest.graph_path(name) for name in checked}  # present, size and fingerprint
        self._threads, self._spinning = threads, spinning
        self.graphs = {name: self._session(name, self._paths[name], threads) for name in _SESSIONS + (
            (TEXT_ENCODER_2,) if config.sdxl else ())}
        self._buffers: dict[tuple, Buffer] = {}
        self._lora_base: dict[str, dict[str, np.ndarray]] = {}  # graph -> {parameter: pristine weight}
        self._lora_inits: dict[str, dict[str, np.ndarray]] = {}  # graph -> {initializer: merged tensor}
        self._external: dict[str, frozenset[str]] = {}  # graph -> its initializers stored as external data
        self._token_tables: dict[str, tuple[str, np.ndarray]] = {}  # textual inversion: graph -> extended table

    def add_token_embeddings(self, vectors: np.ndarray, vectors_2: np.ndarray | None = None) -> Any:
        """Append textual inversion vectors [n, D] to the text encoder's token table; the first new row's id
        (SDXL: `vectors_2` to text_encoder_2's too, and the first new row of each).

        The exported table is read once from the graph; the extended one replaces it in a new text encoder
        session (with any LoRA-merged weights, see _open): no re-export, and the graph keeps its one input
        list on every backend (a table input would make every run bind it)."""
        from ..embeddings import extended_table
        from ..runtime.onnx_files import token_table

        sdxl = self.config.sdxl
        targets = [(TEXT_ENCODER, self.config.text_encoder, vectors)] + (
            [(TEXT_ENCODER_2, self.config.text_encoder_2, vectors_2)] if sdxl else [])
        if any(v is None for *_, v in targets):
            raise InvalidInputError("an SDXL model takes two sets of textual inversion vectors, one per text encoder")
        previous = dict(self._token_tables)
        starts = []
        for graph, te, given in targets:
            if graph not in self._token_tables:
                self._token_tables[graph] = token_table(self._paths[graph], self.manifest.folder, te.vocab_size,
                                                        te.hidden_size)
            name, table = self._token_tables[graph]
            starts.append(table.shape[0])
            self._token_tables[graph] = (name, extended_table(table, np.asarray(given, np.float32)))
        try:
            sessions = {graph: self._open(graph, self._lora_inits.get(graph, {})) for graph, *_ in targets}
        except BaseException:
            self._token_tables = previous
            raise
        self.graphs.update(sessions)  # all or nothing
        return tuple(starts) if sdxl else starts[0]

    def _graph(self, name: str) -> Graph:
        """A graph's session, created on first use (the VAE encoder: only image inputs need it; step caching's
        graphs, verified then)."""
        if name not in self.graphs:
            if name not in self._paths:
                self._paths[name] = self.manifest.graph_path(name)
            self.graphs[name] = self._session(name, self._paths[name], self._threads)
        return self.graphs[name]

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", providers: Sequence[str] | None = None,
             threads: int | None = None, prediction_type: str | None = None, spinning: bool = True,
             **unknown: Any) -> "OnnxRuntimeBackend":
        """Verify the export folder at `path` (manifest, graph hashes, external data) and open its sessions.
        `spinning=False`: ONNX Runtime's intra-op threads sleep between calls (for machines whose cores are shared)."""
        reject_unknown_options("onnxruntime", unknown, ("providers", "threads", "prediction_type", "spinning"))
        if not isinstance(spinning, bool):
            raise InvalidInputError(f"onnxruntime option spinning must be true or false, got {spinning!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise InvalidInputError(f"onnxruntime option threads must be an integer >= 1, got {threads!r}")
        if path is None:
            raise InvalidInputError("the onnxruntime backend needs --model: a folder written by sdengine export")
        chosen = resolve_providers(device, providers)
        return cls(Manifest.read(path), device, chosen, threads, prediction_type, spinning)

    def _lora_map(self, graph: str) -> dict[str, dict[str, Any]]:
        if self.manifest.int8(graph):
            raise LoraError(f"{self.manifest.folder} holds an int8 {graph} graph (sdengine export --int8): a LoRA "
                            f"cannot be merged into its quantized weights; export without --int8 for LoRAs")
        params = self.manifest.graphs[graph].get("parameters")
        if params is None:
            raise LoraError(f"{self.manifest.folder} was exported by an sdengine without LoRA support (its manifest "
                            f"has no weight map for {graph}); re-export it with sdengine export --force")
        return params

    def lora_targets(self) -> dict[str, tuple[int, ...]]:
        """{`unet.<parameter>` / `text_encoder.<parameter>`: shape} of the weights the export can swap."""
        return {name: tuple(v["shape"]) for graph in self._lora_graphs for name, v in self._lora_map(graph).items()}

    def set_loras(self, loras: Sequence[tuple[Any, float]]) -> None:
        """Merge `loras` (LoraFile, scale) with numpy from the pristine initializers and open new text encoder and
        denoise-step sessions whose initializers are the merged tensors, in each initializer's dtype; `[]`
        reopens the graphs as exported. No graph is re-exported or rewritten (see _open)."""
        touched = set().union(*(lora.targets for lora, _ in loras)) if loras else set()
        maps = {graph: self._lora_map(graph) for graph in self._lora_graphs} if touched else {}
        known = set().union(*(set(m) for m in maps.values())) if maps else set()
        if touched - known:
            raise LoraError(f"weights {sorted(touched - known)[:5]} are not single initializers of this export, so "
                            f"they cannot be swapped; use the torch backend for this LoRA")
        changed = {}
        for graph in self._lora_graphs:
            params = maps.get(graph, {})
            mine = touched & set(params)
            base = self._lora_base.setdefault(graph, {})
            for name in list(base):
                if name not in mine:
                    del base[name]
            new = sorted(mine - set(base))
            if new or (mine and graph not in self._external):
                places = {name: params[name]["initializers"][0] for name in new}
                arrays, self._external[graph] = read_initializers(self._paths[graph],
                                                                  {init for init, _ in places.values()})
                for name, (init, transposed) in places.items():
                    base[name] = arrays[init].T if transposed else arrays[init]
            merged = sdlora.merge(base, loras, only=mine)
            inits: dict[str, np.ndarray] = {}
            for name, array in merged.items():
                dtype = base[name].dtype
                for init, transposed in params[name]["initializers"]:
                    inits[init] = np.ascontiguousarray((array.T if transposed else array).astype(dtype))
            if inits or self._lora_inits.get(graph):
                changed[graph] = inits
        sessions = {graph: self._open(graph, inits) for graph, inits in changed.items()}
        for graph, session in sessions.items():  # all or nothing: swap once every session opened
            self.graphs[graph] = session
            self._lora_inits[graph] = changed[graph]

    def _open(self, graph: str, lora: dict[str, np.ndarray]) -> Graph:
        """A new session of `graph` whose initializers are replaced by the LoRA-merged tensors `lora` and, for the
        text encoder, the textual inversion token table. A graph held inline (under 2 GB) is opened from its
        proto with the tensors replaced; weights stored as external data are given with
        add_external_initializers, inline tensors of such a graph with add_initializer (at
        ORT_ENABLE_EXTENDED: ONNX Runtime ignores add_initializer for some weights at ORT_ENABLE_ALL). Each keeps
        every optimisation but the last."""
        inits = dict(lora)
        if graph in self._token_tables:
            name, table = self._token_tables[graph]
            inits[name] = table
        if inits and graph not in self._external:
            self._external[graph] = read_initializers(self._paths[graph], set())[1]
        external = self._external.get(graph, frozenset())
        data = None
        if inits and not external:
            data, inits = with_initializers(self._paths[graph], inits), {}
        return self._session(graph, self._paths[graph], self._threads, inits, external, data)

    def _session(self, name: str, path: Path, threads: int | None, initializers: dict[str, np.ndarray] | None = None,
                 external: frozenset[str] = frozenset(), model_bytes: bytes | None = None) -> Graph:
        options = {}
        spec = spec_of(name, self.config)
        if TENSORRT in self.providers:  # an SDXL VAE kept fp32 in an fp16 export (force_upcast) stays fp32
            fp16 = self.manifest.precision is Precision.FP16 and \
                self.manifest.graphs[name].get("precision", Precision.FP16.value) == Precision.FP16.value
            options[TENSORRT] = tensorrt_options(profile(spec, self.config, self.ranges), fp16,
                                                 self.manifest.folder / "trt-cache")
        graph = Graph(path, spec, self.providers, "cuda" if self.device == "cuda" else "cpu", threads,
                      options, initializers, external, model_bytes, spinning=self._spinning)
        meta = graph.metadata()
        if meta.get(META_GRAPH) != name or meta.get(META_SOURCE) != self.manifest.source_sha256 \
                or meta.get(META_INT8) != self.manifest.int8(name):
            raise ModelLoadError(f"{path} is not the {name} graph of the model this folder's manifest describes; "
                                 f"re-export the folder with sdengine export --force")
        return graph

    @property
    def _where(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"

    def _buffer(self, role: str, shape: tuple[int, ...], dtype: Any = np.float32) -> Buffer:
        """The buffer for `role` at `shape`, allocated on first use and reused after."""
        key = (role, shape, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = Buffer(shape, dtype, self._where)
        return self._buffers[key]

    def text_to_host(self, context: TextEmbeddings) -> np.ndarray:
        """encode_text's output as float32 numpy [R, 77, D]."""
        return context.buffer.read()[: context.rows]

    def _host_context(self, context: np.ndarray) -> TextEmbeddings:
        """Host embeddings [R, 77k, D] (long or weighted prompts) on the device, checked against the export."""
        array = np.ascontiguousarray(context, dtype=np.float32)
        self.ranges.check_context(array.shape[1], self.dims["sequence"].min, _REEXPORT_CHUNKS)
        return TextEmbeddings(Buffer.holding(array, self._where), array.shape[0])

    def encode_text(self, input_ids: np.ndarray, clip_skip: int = 0) -> TextEmbeddings:
        """Token ids [R, 77] -> embeddings [R, 77, D] on the device (clip_skip: of layer -1-clip_skip)."""
        if self.config.sdxl:
            raise InvalidInputError("an SDXL model encodes a prompt with both text encoders: encode_text_sdxl")
        ids = np.asarray(input_ids)
        rows, run_rows = ids.shape[0], ids.shape[0]
        r = self.dims["rows"]
        if self.ranges.static and rows * 2 == r.max:  # a static graph takes 2B rows: run the B rows twice
            ids, run_rows = np.concatenate([ids, ids]), 2 * rows
        check_dim(run_rows, r, "text rows (images, times 2 with guidance)", _REEXPORT)
        te = self.graphs[TEXT_ENCODER]
        shp = {t.name: self._shape(t.dims, rows=run_rows) for t in te.spec.inputs + te.spec.outputs}
        ids_buf = self._buffer("input_ids", shp["input_ids"], np.int32)
        ids_buf.write(ids.astype(np.int32))
        te.bind_buffer("input_ids", ids_buf)
        skip = self._buffer("clip_skip", (1,), np.int32)
        skip.write(np.array([clip_skip], np.int32))
        te.bind_buffer("clip_skip", skip)
        out = Buffer(shp["last_hidden_state"], np.float32, self._where)  # per call: the caller keeps it
        te.bind_output("last_hidden_state", out)
        te.bind_output("pooled_output", self._buffer("pooled_output", shp["pooled_output"]))
        te.run()
        return TextEmbeddings(out, rows)

    def _shape(self, dims: tuple, rows: int = 0, batch: int = 0, lh: int = 0, lw: int = 0) -> tuple[int, ...]:
        values = point_dims(self.config, batch, lh, lw, rows=rows)
        return tuple(d if isinstance(d, int) else values[d] for d in dims)

    def _check_latents(self, shape: tuple[int, ...]) -> None:
        b, c, lh, lw = shape
        f = self.config.vae.downscale
        if c != self.config.vae.latent_channels:
            raise InvalidInputError(f"latents have {c} channels; this model's have {self.config.vae.latent_channels}")
        check_dim(b, self.dims["batch"], "images", _REEXPORT)
        check_dim(lh * f, self.dims["height"], "height", _REEXPORT)
        check_dim(lw * f, self.dims["width"], "width", _REEXPORT)

    def _guided_context(self, context: TextEmbeddings, batch: int) -> Buffer:
        """[2B, 77, D] embeddings for the step graph; B rows (guidance 1) are duplicated."""
        if context.rows == 2 * batch and context.buffer.shape[0] == 2 * batch:
            return context.buffer
        if context.rows != batch:
            raise InvalidInputError(f"{context.rows} text rows for {batch} latents: give B or 2B rows")
        rows = context.buffer.read()[:batch]
        buf = self._buffer("context_x2", (2 * batch, *rows.shape[1:]))
        buf.write(np.concatenate([rows, rows]))
        return buf

    def denoise(self, latents: np.ndarray, context: TextEmbeddings, schedule: Schedule, guidance_scale: float,
                noise: np.ndarray | None, callback: StepCallback | None = None,
                condition: ImageCondition | None = None, added: AddedConditioning | None = None,
                cache: StepCache | None = None) -> BufferView:
        """Every row of `schedule` through the step graph; returns a view of the final latents (slot 0).

        `context`: encode_text's output, or host embeddings [R, 77k, D] (long or weighted prompts); `added`: an
        SDXL model's pooled text and time ids, one row per context row; `cache`: step caching, over the export's
        full and shallow step graphs (_denoise_cached; SD 1.x/2.x exports)."""
        if self.config.sdxl != (added is not None):
            raise InvalidInputError("an SDXL model needs text_embeds and time_ids (AddedConditioning), and only an "
                                    "SDXL model takes them")
        if cache is not None:
            return self._denoise_cached(latents, context, schedule, guidance_scale, noise, callback, condition, cache)
        if isinstance(context, np.ndarray):
            context = self._host_context(context)
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        self._check_latents(latents.shape)
        schedule = fit_slots(schedule, self.ranges.slots, _REEXPORT_SLOTS)
        b, n, slots = latents.shape[0], schedule.num_rows, schedule.slots
        step = self.graphs[DENOISE_STEP]
        state_shape = (slots, *latents.shape)
        ping, pong = self._buffer("state_a", state_shape), self._buffer("state_b", state_shape)
        first = np.zeros(state_shape, np.float32)
        first[0] = latents
        ping.write(first)
        timesteps = Buffer.holding(schedule.timesteps.astype(np.float32).reshape(n, 1), self._where)
        rows = Buffer.holding(schedule.coefficients.astype(np.float32), self._where)
        steps_noise = None if noise is None else Buffer.holding(np.asarray(noise, np.float32), self._where)
        zeros = self._buffer("zeros", latents.shape)  # c = 0 without noise, and no image: never written
        scale = Buffer.holding(np.array([guidance_scale], np.float32), self._where)
        step.bind_buffer("text_embeddings", self._guided_context(context, b))
        step.bind_buffer("guidance_scale", scale)
        blend_row = self._bind_condition(step, condition, latents.shape, n, zeros)
        kept = None if added is None else self._bind_added(step, added, b)  # bound by address: kept alive
        for i in range(n):
            step.bind("state", ping.ptr, ping.shape)
            step.bind("timestep", timesteps.row(i), (1,))
            step.bind("coefficients", rows.row(i), rows.shape[1:])
            step.bind("noise", zeros.ptr if steps_noise is None else steps_noise.row(i), latents.shape)
            step.bind("blend", blend_row(i), (3,))
            step.bind_output("next_state", pong)
            step.run()
            ping, pong = pong, ping
            if callback is not None:
                callback(i + 1, n)
        del kept
        return ping.first(latents.shape)

    @property
    def cache_branches(self) -> tuple[int, ...]:
        """Step caching's branches this export runs (its --step-cache branch), or none."""
        return () if self.ranges.cache_branch is None else (self.ranges.cache_branch,)

    def _check_step_cache(self, cache: StepCache) -> None:
        """InvalidInputError unless this export holds step caching's graphs for cache.branch, unmodified."""
        branch = self.ranges.cache_branch
        if branch is None:
            raise InvalidInputError(f"{self.manifest.folder} has no step caching graphs: export it with sdengine "
                                    f"export --step-cache {cache.branch}, or run without cache_interval")
        if branch != cache.branch:
            raise InvalidInputError(f"{self.manifest.folder} holds step caching graphs for cache_branch {branch}, not "
                                    f"{cache.branch}: use cache_branch {branch} or re-export with --step-cache "
                                    f"{cache.branch}")
        if self._lora_inits.get(DENOISE_STEP):
            raise InvalidInputError("step caching with U-Net LoRAs is not supported on the onnxruntime backend yet "
                                    "(the full and shallow step graphs keep the exported weights): use the torch "
                                    "backend")

    def _denoise_cached(self, latents: np.ndarray, context: Any, schedule: Schedule, guidance_scale: float,
                        noise: np.ndarray | None, callback: StepCallback | None, condition: ImageCondition | None,
                        cache: StepCache) -> BufferView:
        """denoise alternating the full step graph (which also writes the deep feature into a buffer kept across
        rows) and the shallow one (which reads it), as cache.full(i) says; the same IO binding otherwise."""
        self._check_step_cache(cache)
        if isinstance(context, np.ndarray):
            context = self._host_context(context)
        latents = np.ascontiguousarray(latents, dtype=np.float32)
        self._check_latents(latents.shape)
        schedule = fit_slots(schedule, self.ranges.slots, _REEXPORT_SLOTS)
        b, n, slots = latents.shape[0], schedule.num_rows, schedule.slots
        full, shallow = self._graph(DENOISE_STEP_FULL), self._graph(DENOISE_STEP_SHALLOW)
        state_shape = (slots, *latents.shape)
        ping, pong = self._buffer("state_a", state_shape), self._buffer("state_b", state_shape)
        first = np.zeros(state_shape, np.float32)
        first[0] = latents
        ping.write(first)
        feature = self._buffer(DEEP_FEATURE, cache_split(self.config.unet, cache.branch).feature_shape(
            2 * b, *latents.shape[2:]))
        timesteps = Buffer.holding(schedule.timesteps.astype(np.float32).reshape(n, 1), self._where)
        rows = Buffer.holding(schedule.coefficients.astype(np.float32), self._where)
        steps_noise = None if noise is None else Buffer.holding(np.asarray(noise, np.float32), self._where)
        zeros = self._buffer("zeros", latents.shape)
        scale = Buffer.holding(np.array([guidance_scale], np.float32), self._where)
        text = self._guided_context(context, b)
        blend_row = None
        for step in (full, shallow):
            step.bind_buffer("text_embeddings", text)
            step.bind_buffer("guidance_scale", scale)
            blend_row = self._bind_condition(step, condition, latents.shape, n, zeros)
        full.bind_output(DEEP_FEATURE, feature)
        shallow.bind_buffer(DEEP_FEATURE, feature)
        for i in range(n):
            step = full if cache.full(i) else shallow
            step.bind("state", ping.ptr, ping.shape)
            step.bind("timestep", timesteps.row(i), (1,))
            step.bind("coefficients", rows.row(i), rows.shape[1:])
            step.bind("noise", zeros.ptr if steps_noise is None else steps_noise.row(i), latents.shape)
            step.bind("blend", blend_row(i), (3,))
            step.bind_output("next_state", pong)
            step.run()
            ping, pong = pong, ping
            if callback is not None:
                callback(i + 1, n)
        return ping.first(latents.shape)

    def _bind_condition(self, step: Graph, condition: ImageCondition | None, shape: tuple[int, ...], rows: int,
                        zeros: Buffer) -> Callable[[int], int]:
        """Bind the mask, known latent and its noise (zeros for text to image); row i's blend address."""
        b, _, lh, lw = shape
        if condition is None:
            step.bind_buffer("mask", self._buffer("zero_mask", (b, 1, lh, lw)))
            step.bind_buffer("known", zeros)
            step.bind_buffer("known_noise", zeros)
            no_blend = self._buffer("zero_blend", (3,))
            return lambda i: no_blend.ptr
        for name in ("mask", "known", "known_noise"):
            step.bind_buffer(name, Buffer.holding(np.asarray(getattr(condition, name), np.float32), self._where))
        blend = Buffer.holding(np.asarray(condition.blend, np.float32).reshape(rows, 3), self._where)
        return blend.row

    def encode_text_sdxl(self, ids: np.ndarray, ids_2: np.ndarray,
                         clip_skip: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SDXL: token ids [R, 77] of each tokenizer -> both encoders' hidden states of layer -2-clip_skip
        ([R, 77, D1], [R, 77, D2]) and text_encoder_2's pooled, projected output [R, P], float32 on the host."""
        hidden, _ = self._run_text(TEXT_ENCODER, ids, clip_skip)
        hidden_2, pooled = self._run_text(TEXT_ENCODER_2, ids_2, clip_skip)
        return hidden, hidden_2, pooled

    def _run_text(self, name: str, input_ids: np.ndarray, clip_skip: int) -> tuple[np.ndarray, ...]:
        """One SDXL text encoder graph over token ids [R, 77]: its outputs' first R rows on the host."""
        ids = np.asarray(input_ids)
        rows, run_rows = ids.shape[0], ids.shape[0]
        r = self.dims["rows"]
        if self.ranges.static and rows * 2 == r.max:  # a static graph takes 2B rows: run the B rows twice
            ids, run_rows = np.concatenate([ids, ids]), 2 * rows
        check_dim(run_rows, r, "text rows (images, times 2 with guidance)", _REEXPORT)
        te = self.graphs[name]
        shp = {t.name: self._shape(t.dims, rows=run_rows) for t in te.spec.inputs + te.spec.outputs}
        ids_buf = self._buffer(f"{name}.input_ids", shp["input_ids"], np.int32)
        ids_buf.write(ids.astype(np.int32))
        te.bind_buffer("input_ids", ids_buf)
        skip = self._buffer(f"{name}.clip_skip", (1,), np.int32)
        skip.write(np.array([clip_skip], np.int32))
        te.bind_buffer("clip_skip", skip)
        outs = [self._buffer(f"{name}.{t.name}", shp[t.name]) for t in te.spec.outputs]
        for t, buf in zip(te.spec.outputs, outs):
            te.bind_output(t.name, buf)
        te.run()
        return tuple(buf.read()[:rows] for buf in outs)

    def _bind_added(self, step: Graph, added: AddedConditioning, batch: int) -> list[Buffer]:
        """Bind SDXL's text_embeds [2B, P] and time_ids [2B, 6] once per call (B rows, guidance 1: duplicated, as
        the context is); the buffers, which must outlive the loop."""
        kept = []
        for name in ("text_embeds", "time_ids"):
            array = np.ascontiguousarray(getattr(added, name), dtype=np.float32)
            if array.shape[0] == batch:
                array = np.concatenate([array, array])
            if array.shape[0] != 2 * batch:
                raise InvalidInputError(f"{array.shape[0]} rows of {name} for {batch} latents: give B or 2B rows")
            kept.append(Buffer.holding(array, self._where))
            step.bind_buffer(name, kept[-1])
        return kept

    def encode_image(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images [B,3,H,W] in [-1, 1] -> scaled latent mean and std of q(z|x), on the host (vae_encoder graph)."""
        images = np.ascontiguousarray(images, dtype=np.float32)
        b, _, h, w = images.shape
        f = self.config.vae.downscale
        self._check_latents((b, self.config.vae.latent_channels, h // f, w // f))
        vae = self._graph(VAE_ENCODER)
        vae.bind_buffer("image", Buffer.holding(images, self._where))
        out = {name: self._buffer(name, (b, self.config.vae.latent_channels, h // f, w // f))
               for name in vae.spec.output_names}
        for name, buf in out.items():
            vae.bind_output(name, buf)
        vae.run()
        return out["latent_mean"].read(), out["latent_std"].read()

    can_decode_fp32 = False  # the export holds one decoder graph; an fp16 one is not decoded again in fp32

    @property
    def fp32_advice(self) -> str:
        if self.manifest.precision is Precision.FP16:
            return "export the model without --fp16 (sdengine export --out DIR) and run that folder"
        return "the float32 VAE decoder produced them: the model's VAE weights are broken or overflow"

    def decode(self, latents: Buffer | BufferView | np.ndarray, fp32: bool = False) -> np.ndarray:
        """Scaled latents -> float32 images [B, 3, H, W] on the host (the graph divides by scaling_factor)."""
        if not isinstance(latents, (Buffer, BufferView)):
            array = np.ascontiguousarray(latents, dtype=np.float32)
            self._check_latents(array.shape)
            latents = Buffer.holding(array, self._where)
        vae = self.graphs[VAE_DECODER]
        b, _, lh, lw = latents.shape
        image = self._buffer("image", self._shape(vae.spec.outputs[0].dims, batch=b, lh=lh, lw=lw))
        vae.bind_buffer("latent", latents)
        vae.bind_output("image", image)
        vae.run()
        return image.read()

