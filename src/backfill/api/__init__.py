"""HTTP API: the OpenAI-compatible Files, Batches and Models routes (FastAPI)."""
