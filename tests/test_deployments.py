"""The whole local Prefect path: server, process worker, `prefect deploy --all` from prefect.yaml,
`prefect deployment run` of the pipeline on a tiny model, artifacts through the API, then `memlora verify`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from memlora.processes import stop_group
from memlora.serve import (
    crash_in_flight, deploy_all, deployed_summary, ensure_pool, prefect, prefect_env, run_hint, start,
)
from tests.conftest import REPO


def tiny_config(path: Path, model_dir: Path) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["name"] = "tiny"
    raw["teacher"].update(model=str(model_dir), device="cpu", logprobs_top_k=4)
    raw["data"].update(max_conversations=1, max_sessions=1, max_questions=2)
    raw["memory"].update(window=4, max_facts=2, max_fact_chars=40, answer_max_chars=24)
    raw["memory"]["operations"] = {"extraction": {"max_new_tokens": 48}, "update": {"max_new_tokens": 48},
                                   "generation": {"max_new_tokens": 16}}
    raw["student"]["prune"] = {"from": "teacher", "every": 2}
    raw["distill"].update(max_steps=2, batch_size=2, num_ranks=1)
    raw["evaluation"].update(max_conversations=1, max_sessions=1, max_questions=2, bootstrap_samples=50)
    raw["prefect"] = {"concurrency": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


async def _artifacts(flow_run_name: str | None = None):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_artifacts()


async def _scheduled_runs(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
        )
        return deployment, runs


async def _pause_schedules(deployment) -> None:
    """So no test worker picks up a nightly run that falls due while the suite runs."""
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for schedule in deployment.schedules:
            await client.update_deployment_schedule(deployment.id, schedule.id, active=False)
        _, runs = await _scheduled_runs("memlora-pipeline/embedded-default")
        for run in runs:
            await client.delete_flow_run(run.id)


@pytest.mark.prefect
@pytest.mark.timeout(300)
def test_the_nightly_schedule_creates_runs(prefect_server):
    """The scheduler must create the nightly runs (SQLAlchemy 2.1 made it fail silently on every pass)."""
    env = prefect_env(prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]))
    ensure_pool("memlora-pool", env)
    summary = deployed_summary(deploy_all(env))
    assert "memlora-pipeline/embedded-default" in summary and "start a worker" not in summary
    for line in summary.splitlines():  # each deployment with its whole id (a narrow box once cut them off)
        assert re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", line), summary
    deadline = time.monotonic() + 150
    runs = []
    while time.monotonic() < deadline:
        deployment, runs = asyncio.run(_scheduled_runs("memlora-pipeline/embedded-default"))
        if runs:
            break
        time.sleep(2)
    try:
        assert runs, "the scheduler created no run of the nightly deployment within 150 s"
        for run in runs:
            when = run.expected_start_time.astimezone(timezone.utc)
            assert (when.hour, when.minute) == (2, 0) and when > datetime.now(timezone.utc), when
        log = (prefect_server["home"] / "server.log").read_text(errors="replace")
        for marker in ("schedule_deployments", "InvalidRequestError", "Traceback"):
            assert marker not in log, f"server log has {marker!r}:\n{log[-3000:]}"
        # `memlora serve`'s hint works as printed in a fresh shell: no venv on PATH, no PREFECT_API_URL.
        hint = run_hint(prefect_server["url"])
        assert hint.count("--param out=/") == 2 and "improve/embedded-default" in hint  # each run names its OUT
        listing = hint.splitlines()[3].strip()
        fresh = {"PATH": "/usr/bin:/bin", "HOME": str(prefect_server["home"]), "PREFECT_HOME": str(prefect_server["home"])}
        done = subprocess.run(["bash", "-c", listing], env=fresh, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and any(str(r.id)[:13] in done.stdout for r in runs), done.stdout + done.stderr
    finally:
        asyncio.run(_pause_schedules(deployment))


async def _running_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        run = await client.create_flow_run_from_deployment(deployment.id)
        await client.set_flow_run_state(run.id, Running(), force=True)
        return run


async def _state(run_id):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return (await client.read_flow_run(run_id)).state


@pytest.mark.prefect
@pytest.mark.timeout(300)
def test_a_run_left_in_flight_when_serve_stops_is_marked_crashed(prefect_server):
    """Ctrl-C on `memlora serve` stops the worker; its run stayed RUNNING and, with the pipeline's concurrency
    limit of 1, held the slot the next nightly run needed."""
    env = prefect_env(prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]))
    ensure_pool("memlora-pool", env)
    deploy_all(env)
    run = asyncio.run(_running_run("memlora-pipeline/embedded-default"))
    assert asyncio.run(_state(run.id)).type.value == "RUNNING"
    crashed = crash_in_flight(prefect_server["url"], "memlora-pool", "stopped in flight (test)")
    assert run.name in crashed
    state = asyncio.run(_state(run.id))
    assert state.type.value == "CRASHED" and state.message == "stopped in flight (test)"
    assert crash_in_flight(prefect_server["url"], "memlora-pool", "again") == []


@pytest.mark.prefect
@pytest.mark.timeout(1500)
def test_deployment_run_of_the_pipeline_then_verify(prefect_server, tiny_model_dir, sample_path, tmp_path):
    env = prefect_env(prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]))
    ensure_pool("memlora-pool", env)
    deployed = deploy_all(env)
    assert "memlora-pipeline/embedded-default" in deployed
    config = tiny_config(tmp_path / "tiny.yaml", tiny_model_dir)
    out = tmp_path / "out"
    worker = start(["worker", "start", "--pool", "memlora-pool"], env, tmp_path / "worker.log")
    try:
        run = prefect(
            ["deployment", "run", "memlora-pipeline/embedded-default", "--param", f"config_path={config}",
             "--param", f"data={sample_path}", "--param", f"out={out}", "--watch", "--watch-timeout", "1300"],
            env, timeout_s=1400,
        )
        log = (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{log}"
        assert "Completed" in run.stdout + run.stderr
    finally:
        stop_group(worker)

    artifacts = asyncio.run(_artifacts())
    keys = {a.key for a in artifacts}
    assert "memlora-dataset-release" in keys
    releases = list((out / "releases").glob("*/latest"))
    assert len(releases) == 1
    release = releases[0].resolve()
    import pyarrow.parquet as pq

    for op in ("extraction", "update", "generation"):  # an expert wherever the teacher left usable rows
        usable = sum(pq.read_table(out / "traces" / op).column("parse_ok").to_pylist())
        assert (out / "adapters" / op / "adapter_model.safetensors").is_file() == (usable > 0)
    assert (out / "eval" / "results.parquet").is_file() and (out / "eval" / "report.png").is_file()
    assert (release / "README.md").is_file() and "load_dataset" in (release / "README.md").read_text()

    verify = [sys.executable, "-m", "memlora.cli", "verify"]
    ok = subprocess.run(verify + [str(releases[0].parent)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    victim = sorted(release.rglob("*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = subprocess.run(verify + [str(release)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert victim.relative_to(release).as_posix() in bad.stderr and "sha256" in bad.stderr


def test_a_server_address_is_a_url_an_ipv6_host_in_brackets():
    from memlora.serve import base_url

    assert base_url("127.0.0.1", 4200) == "http://127.0.0.1:4200"
    assert base_url("::1", 8100) == "http://[::1]:8100"  # was http://::1:8100, which no client can open
