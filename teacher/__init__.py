"""LLM backends (local transformers, OpenAI-compatible HTTP) and teacher trace generation."""
