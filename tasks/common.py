"""Tasks every flow uses: config loading, ingest and the manifest."""

from __future__ import annotations

import importlib
import logging
from contextlib import contextmanager

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from memlora.config import Config, ConfigError, PrefectConfig, load_config
from memlora.data.ingest import ingest
from memlora.data.records import Conversation
from memlora.manifest import update_manifest
from memlora.outlock import out_lock, require_out


class PrefectLogHandler(logging.Handler):
    """Forward the domain packages' `memlora.*` log records into the running task's or flow's log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            get_run_logger().log(record.levelno, "%s", record.getMessage())
        except Exception:  # outside a run context: nothing to forward to
            pass


def forward_domain_logs() -> None:
    root = logging.getLogger("memlora")
    if not any(isinstance(h, PrefectLogHandler) for h in root.handlers):
        root.addHandler(PrefectLogHandler())
        root.setLevel(logging.INFO)


@contextmanager
def holding_out(out: str, name: str, create: bool = True):
    """This flow run holds OUT's writer lock (memlora.outlock); one that finds it taken waits, saying for whom.
    `create` False: a flow that needs an existing OUT fails on a missing one (OutMissing) and creates nothing."""
    if not create:
        require_out(out, name)
    log = get_run_logger()
    with out_lock(out, name,
                  on_wait=lambda who: log.warning("%s is in use by %s: waiting for it to finish", out, who)):
        yield


@task(name="load-config", cache_policy=NONE)
def load_config_task(path: str) -> Config:
    return load_config(path)


@task(name="ingest", cache_policy=NONE)
def ingest_task(data: str, out: str, config: Config) -> list[Conversation]:
    corpus = ingest(data, out, config.data)
    n = {split: sum(c.split == split for c in corpus) for split in ("train", "validation", "test")}
    get_run_logger().info(
        "ingested %d conversations (%d train, %d validation, %d test), %d turns, %d questions from %s",
        len(corpus), n["train"], n["validation"], n["test"], sum(len(c.turns) for c in corpus),
        sum(len(c.questions) for c in corpus), data,
    )
    return corpus


@task(name="update-manifest", cache_policy=NONE)
def manifest_task(out: str, section: str, payload: dict) -> dict:
    return update_manifest(out, section, payload)


def build_task_runner(cfg: PrefectConfig):
    """The task runner `prefect.task_runner` names, with `prefect.concurrency` workers unless its options say."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if cfg.task_runner == "thread":
        return ThreadPoolTaskRunner(max_workers=cfg.concurrency)
    if cfg.task_runner == "process":
        return ProcessPoolTaskRunner(max_workers=cfg.concurrency)
    module, _, name = cfg.task_runner.partition(":")
    try:
        runner_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"prefect.task_runner: cannot import {cfg.task_runner} ({err}); install its Prefect "
                          "integration, e.g. `pip install prefect-dask` or `pip install prefect-ray`") from None
    return runner_class(**cfg.task_runner_options)
