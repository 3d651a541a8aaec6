"""`nanoseek serve`: the DeepSeek/OpenAI-compatible HTTP API — its contract (schemas, errors), API keys and
the usage ledger (store), and rate limits (limits)."""
