"""Prefect tasks: thin wrappers over the domain packages (retries, caching, logging)."""
