"""Teacher traces: the memory system run over conversations with the teacher, every call a Parquet row."""
