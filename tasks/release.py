"""Publish the run's datasets as a versioned release and point a Prefect artifact at it."""

from __future__ import annotations

import json

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.release import publish_release


@task(name="publish-release", cache_policy=NONE)
def publish_release_task(out: str, config: Config, data: str) -> str:
    published = publish_release(out, config, data)
    release = published.path
    manifest = json.loads((release / "manifest.json").read_text())
    create_table_artifact(
        key="memlora-dataset-release",
        table=[{"release": str(release.resolve()), "file": f["path"], "rows": f.get("rows"),
                "sha256": f["sha256"][:16]} for f in manifest["files"]],
        description=f"Dataset release {manifest['name']} {manifest['version']} at {release.resolve()} "
                    f"{'' if published.new else '(unchanged: this run wrote the same files) '}"
                    f"(check it with `memlora verify {release.resolve()}`)",
    )
    get_run_logger().info("published release %s" if published.new else
                          "release %s unchanged: this run's datasets, traces and results are its files", release)
    return str(release)
