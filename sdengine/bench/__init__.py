"""`sdengine bench`: per-stage latency, end-to-end p50/p95, images/s per batch size, peak memory and start-up
cost of any backend, and of diffusers' StableDiffusionPipeline on the same weights, in one run.

Modules: settings (what is measured), timing (timers, percentiles), memory (host and GPU peaks),
stages and diffusers_stages (the calls each stage times), worker (one subject per process),
runner (model preparation, workers), report (JSON document, Markdown tables), cli (argparse).
"""
