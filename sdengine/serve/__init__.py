"""`sdengine serve`: an HTTP server over one pipeline, batching compatible requests into one denoise loop.

Modules: `schema` (request validation), `batcher` (queue and micro-batching worker), `metrics`
(Prometheus text), `app` (the Starlette ASGI app), `cli` (arguments, start-up checks, uvicorn).
Importing this package or `sdengine.serve.cli` imports neither uvicorn, starlette nor torch.
"""
