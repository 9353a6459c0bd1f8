"""Settings of the browser tier's server, importable by tests (conftest is not)."""

KEY = "sk-browser-tier-0123456789"
MODEL = "slow"
#: the model's batch ceiling, which the models page must show
LIMIT = 2
#: a model with no `[prices.<model>]`: its tokens are reported, its cost is not
FREE_MODEL = "free"
#: `slow`'s real-time price per million tokens (large, so the page shows cents, not micros)
PRICE_INPUT = "1000"
PRICE_OUTPUT = "3000"
