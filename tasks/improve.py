"""Tasks of `improve`: thin wrappers over `memlora.student.improve` (no retries: a failed training leaves the
served experts as they are, and the run fails with the reason)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.data.compaction import compact_traces
from memlora.evaluation.deferral import stale_thresholds, summary
from memlora.evaluation.gate import Decision
from memlora.layout import deferral_path, traces_root
from memlora.manifest import read_manifest, update_manifest
from memlora.student.build import build_student
from memlora.student.improve import Candidate, gate, new_rows, prepare_candidate, promote, recalibrate, \
    record_decisions


@task(name="compact-traces", cache_policy=NONE)
def compact_traces_task(config: Config, out: str) -> list[dict]:
    """Captured shards merged before anything reads them (they change no fingerprint: data.compaction)."""
    if not config.capture.compact_at:
        return []
    # The merged shards stay (unread) until the next night's compaction: a flow reading OUT's traces now may
    # have listed them a moment ago.
    done = [asdict(c) for c in compact_traces(traces_root(out), min_shards=config.capture.compact_at,
                                                max_rows=config.capture.compact_rows, remove=False)
            if c.shards or c.finished]
    for c in done:
        get_run_logger().info("%s: %d captured shards (%d rows) merged into %s; %d merged the night before "
                              "removed", c["operation"], c["shards"], c["rows"], ", ".join(c["files"]) or "-",
                              c["finished"])
    if done and read_manifest(out):
        update_manifest(out)
    return done


@task(name="new-rows", cache_policy=NONE)
def new_rows_task(config: Config, out: str) -> dict[str, int]:
    counts = new_rows(config, out)
    get_run_logger().info("trace rows the served experts were not trained on, per operation: %s", counts or "none")
    return counts


@task(name="prepare-candidate", cache_policy=NONE)
def prepare_candidate_task(config: Config, out: str, counts: dict[str, int]) -> Candidate:
    candidate = prepare_candidate(config, out, counts)
    get_run_logger().info("candidates train in %s%s", candidate.out, "; warm start from the served " +
                          ", ".join(sorted(candidate.init)) if candidate.init else " (fresh experts)")
    return candidate


@task(name="gate", cache_policy=NONE)
def gate_task(config: Config, out: str, base: Path, candidate: Candidate) -> list[Decision]:
    decisions = gate(config, out, base, candidate)
    for d in decisions:
        get_run_logger().info("%s: %s (%s)", d.operation, "promote" if d.promote else "keep the current expert",
                              d.reason)
    return decisions


@task(name="promote", cache_policy=NONE)
def promote_task(config: Config, out: str, base: Path, candidate: Candidate, decisions: list[Decision]) -> dict:
    version = promote(config, out, base, candidate, decisions)
    path = record_decisions(out, candidate, decisions, version)
    promoted = [d.operation for d in decisions if d.promote]
    create_table_artifact(key="improve-decisions", table=[{**d.to_row(), "run": candidate.run} for d in decisions],
                          description=f"improve {candidate.run}: promoted {promoted or 'nothing'}")
    kept = f"; the experts served before are version {version}" if version else ""
    get_run_logger().info("promoted %s%s; decisions in %s", ", ".join(promoted) or "nothing", kept, path)
    if deferral_path(out).is_file():  # recalibrated tonight (a promotion, or calls the served experts answered)
        log_thresholds(out)
    return {"run": candidate.run, "promoted": promoted, "version_before": version,
            "decisions": [d.to_row() for d in decisions]}


@task(name="recalibrate-stale", cache_policy=NONE)
def recalibrate_stale_task(config: Config, out: str) -> list[str]:
    """Thresholds fitted on experts that serve no more (a `memlora distill` or a rollback since) refitted on those
    that do; until then a server defers every call of theirs."""
    stale = stale_thresholds(out)
    if stale:
        log = get_run_logger()
        log.info("deferral thresholds of %s were fitted on other experts than those served: recalibrating",
                 ", ".join(stale))
        if recalibrate(config, out, build_student(config, out, on_line=log.info)) is None:
            log.warning("no held-out calls to recalibrate on: every call of %s stays deferred", ", ".join(stale))
        else:
            log_thresholds(out)
    return stale


def log_thresholds(out: str) -> None:
    get_run_logger().info("deferral thresholds:\n%s", summary(json.loads(deferral_path(out).read_text())))
