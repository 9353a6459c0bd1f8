"""Webhooks: OpenAI's batch events delivered from the store's outbox (`domain/webhooks.py`)."""
