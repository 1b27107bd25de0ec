"""The embedded default's config and sample, found from any working directory.

`make run` runs in the repository, where the defaults `configs/default.yaml` and `data/samples/...` are relative
paths that exist. A team runs `memlora serve-experts --out /srv/memlora/out` from wherever it keeps its OUT, and
the default config must still be the embedded one rather than "config file not found". A file of that name in
the working directory wins (a user's own copy); otherwise the one installed beside this package is used.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEFAULT_CONFIG = "configs/default.yaml"
DEFAULT_DATA = "data/samples/locomo_sample12.json"


def installed_config(relative: str | Path) -> Path:
    return Path(__file__).resolve().parent.parent / relative  # configs/ sits beside the packages in the checkout


def _installed(default: str) -> Path:
    if default == DEFAULT_DATA:  # package data of memlora.data (the repository's data/ folder)
        return Path(str(files("memlora.data"))) / Path(default).relative_to("data")
    return installed_config(default)


def bundled(default: str) -> str:
    """`default` as it is where it exists from the working directory, else the installed copy (where that is
    missing too, `default` unchanged, so the error names the path the user saw in --help)."""
    if Path(default).exists():
        return default
    installed = _installed(default)
    return str(installed) if installed.is_file() else default
