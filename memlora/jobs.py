"""A job handed across a process boundary: the run's resolved config and what the other process needs, in one
JSON file under OUT (`layout.job_path`).

The run parses its YAML once; DeepSpeed ranks and evaluation processes read this file instead of the YAML, so
they work from the very config the run validated and keyed its caches on, even if the YAML is edited meanwhile.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from memlora.config import Config, parse_config
from memlora.data.io import write_json, write_text
from memlora.layout import job_path


def write_job(config: Config, out: str | Path, name: str, **fields) -> Path:
    path = job_path(out, name)
    write_json({"config": config.model_dump(mode="json", by_alias=True), "out": str(Path(out).resolve()), **fields},
               path)
    return path.resolve()


def read_job(path: str | Path) -> tuple[Config, dict]:
    """(the config, the job's other fields)."""
    data = json.loads(Path(path).read_text())
    return parse_config(data.pop("config"), path), data


def write_resolved_config(config: Config, out: str | Path) -> Path:
    """The validated config as a YAML file under OUT, for flows that take a config path (a pipeline's stages)."""
    path = job_path(out, "config").with_suffix(".yaml")
    write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True), sort_keys=False), path)
    return path.resolve()
