"""HTTP serving for an export directory: `ortseq serve DIR` (needs the [serve] extra: fastapi, uvicorn).

One module per concern: `schema` (request/response shapes and per-request limits), `inference` (texts
to token rows and generated rows to summaries, run by the worker thread that owns the model),
`batcher` (dynamic batching: asyncio queue + that one worker thread), `metrics` (Prometheus text),
`app` (the FastAPI app and its error responses) and `server` (uvicorn, signals, draining).
"""
