"""The ExpertRAG service: an HTTP API over the pipeline (FastAPI on uvicorn).

`service.Service` is the core and knows nothing of HTTP (keys, rate limits, the answer engine, ingestion);
`app.create_app` is the thin HTTP layer over it; `server.run` serves it with graceful draining.
"""
