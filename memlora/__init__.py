"""memlora: distil a large LLM into a small student with one DeLoRA expert per memory operation."""

__version__ = "0.1.0"
