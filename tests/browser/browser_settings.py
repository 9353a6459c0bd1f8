"""Settings of the browser tier's server, importable by tests (conftest is not)."""

KEY = "sk-browser-tier-0123456789"
MODEL = "slow"
#: the model's batch ceiling, which the models page must show
LIMIT = 2
