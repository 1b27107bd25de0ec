"""Prefect flows: each reads like the recipe; the logic lives in the domain packages."""
