"""The Mem0-style memory system: operations, prompt templates, output parsing, store and retrieval."""
