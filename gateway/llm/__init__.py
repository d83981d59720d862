"""LLM token streams: streamed NDJSON publish, and a relay from an OpenAI-compatible upstream."""
