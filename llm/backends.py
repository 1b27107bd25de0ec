"""Build the backend a config names."""

from __future__ import annotations

from memlora.config import LLMConfig
from memlora.memory.llm import LLMBackend


def build_backend(config: LLMConfig) -> LLMBackend:
    # Each backend imported where it is chosen: an HTTP teacher needs neither torch nor transformers loaded, and a
    # local model no HTTP client.
    if config.backend == "openai":
        from memlora.llm.http_backend import OpenAIBackend

        return OpenAIBackend(config)
    from memlora.llm.hf_backend import TransformersBackend

    return TransformersBackend.from_config(config)
