"""backfill: a self-hosted, OpenAI-compatible Batch API for LLM inference."""

__version__ = "0.1.0"
