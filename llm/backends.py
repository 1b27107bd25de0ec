"""Build the backend a config names."""

from __future__ import annotations

from memlora.config import LLMConfig
from memlora.memory.llm import LLMBackend


def build_backend(config: LLMConfig) -> LLMBackend:
    if config.backend == "openai":
        # imported here: an HTTP teacher needs neither torch nor transformers loaded
        from memlora.llm.http_backend import OpenAIBackend

        return OpenAIBackend(config)
    # imported here: a local model loads torch and transformers, which an HTTP teacher's process never needs
    from memlora.llm.hf_backend import TransformersBackend

    return TransformersBackend.from_config(config)
