"""`sdengine serve`: an HTTP server over one pipeline, batching compatible requests into one denoise loop.

Modules: `schema` (the request and response bodies as pydantic models, validated against the loaded model's
limits), `batcher` (queue and micro-batching worker), `metrics` (prometheus_client), `app` (the FastAPI app),
`edits` (the multipart edit form), `cli` (arguments, start-up checks, uvicorn or Ray Serve), `ray` (the Ray
Serve deployment over the same app). Importing this package or `sdengine.serve.cli` imports neither
uvicorn, fastapi, ray nor torch.
"""
