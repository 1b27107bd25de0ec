"""`memlora serve` / `make serve`: a local Prefect server (SQLite) and a process worker with the deployments of
prefect.yaml, brought up together and torn down together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from memlora.models import OFFLINE_ENV
from memlora.processes import stop_group


def checkout() -> Path:
    """The checkout holding prefect.yaml: the working directory where it has one (`make serve` and the tests run
    from its root), else the one this package runs from, so that `memlora serve` works from any folder."""
    here, installed = Path.cwd(), Path(__file__).resolve().parent.parent
    return installed if not (here / "prefect.yaml").is_file() and (installed / "prefect.yaml").is_file() else here


REPO = checkout()
BIN = Path(sys.executable).parent


class ServeError(RuntimeError):
    """Prefect's server, work pool or deploy could not be brought up: the message carries Prefect's own words."""


def base_url(host: str, port: int) -> str:
    """An address as a URL: an IPv6 host goes in brackets (http://[::1]:4200)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def prefect_env(api_url: str, **extra: str) -> dict:
    # COLUMNS: Prefect prints tables sized to the terminal, and without one it cut deployment ids off.
    env = dict(os.environ, **OFFLINE_ENV, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PWD=str(REPO), COLUMNS="200")
    env.update(extra)
    return env


def wait_healthy(api_url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServeError(f"server {proc.args[1:3] if isinstance(proc.args, list) else proc.args} exited "
                             f"with code {proc.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServeError(f"{api_url} not healthy after {timeout_s:.0f} s")


def prefect(args: list[str], env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ServeError(f"prefect {' '.join(args)}: no answer after {timeout_s:.0f} s") from None


def ensure_pool(pool: str, env: dict) -> None:
    if prefect(["work-pool", "inspect", pool], env).returncode != 0:
        done = prefect(["work-pool", "create", pool, "--type", "process"], env)
        if done.returncode != 0:
            raise ServeError(f"could not create work pool {pool}: {done.stdout}{done.stderr}")


def deploy_all(env: dict) -> str:
    done = prefect(["--no-prompt", "deploy", "--all"], env)
    if done.returncode != 0:
        raise ServeError(f"prefect deploy --all failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def deployed_summary(output: str) -> str:
    """Prefect's deploy output, less its advice to start a worker (serve has started one) and its
    `prefect deployment run` hints (which need this venv's prefect and PREFECT_API_URL: see run_hint)."""
    names = [line.strip(" │|\t") for line in output.splitlines() if "Deployment '" in line]
    return "\n".join(names) if names else output


def run_hint(api_url: str) -> str:
    """Commands that work as printed in a fresh shell (no venv activated, no PREFECT_API_URL exported). Each names
    its OUT: a deployment's default `out` is relative to the checkout, where a newcomer did not expect it."""
    head = f"PREFECT_API_URL={api_url} {BIN / 'prefect'}"
    out = REPO / "out"
    return (f"Run the pipeline now, from another shell (it writes into {out}; choose with --param out=PATH):\n"
            f"  {head} deployment run 'memlora-pipeline/embedded-default' --param out={out} --watch\n"
            f"List scheduled runs:\n"
            f"  {head} flow-run ls --state SCHEDULED\n"
            f"Learn from the traces that arrived since (the nightly loop, on the same OUT):\n"
            f"  {head} deployment run 'improve/embedded-default' --param out={out} --watch\n"
            f"Ctrl-C here stops the server and the worker; a run in flight is marked crashed.")


async def _crash_in_flight(api_url: str, pool: str, reason: str) -> list[str]:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, WorkPoolFilter, WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    in_flight = [StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]
    async with PrefectClient(api=api_url) as client:
        runs = await client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=in_flight))))
        for run in runs:
            await client.set_flow_run_state(run.id, Crashed(message=reason), force=True)
        return [run.name for run in runs]


def crash_in_flight(api_url: str, pool: str, reason: str) -> list[str]:
    """Mark the pool's runs still pending or running as crashed (their worker is gone), which also frees their
    deployment's concurrency slot: left RUNNING, a run stopped by Ctrl-C held the pipeline's only slot, and the
    next nightly run waited behind it. Returns the runs' names."""
    import asyncio

    return asyncio.run(_crash_in_flight(api_url, pool, reason))


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), *args], env=env, cwd=REPO, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def serve(host: str = "127.0.0.1", port: int = 4200, pool: str = "memlora-pool", deploy: bool = True) -> int:
    if deploy and not (REPO / "prefect.yaml").is_file():
        raise FileNotFoundError(f"{REPO / 'prefect.yaml'}: no deployments to serve (run from the checkout that holds "
                                "it, or give --no-deploy)")
    api_url = f"{base_url(host, port)}/api"
    env = prefect_env(api_url)
    logs = REPO / ".prefect-serve"
    logs.mkdir(exist_ok=True)
    server = start(["server", "start", "--host", host, "--port", str(port)], env, logs / "server.log")
    worker = None
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        wait_healthy(api_url, server)
        ensure_pool(pool, env)
        if deploy:
            print(deployed_summary(deploy_all(env)))
        worker = start(["worker", "start", "--pool", pool], env, logs / "worker.log")
        print(f"Prefect UI and API at {base_url(host, port)} (logs in {logs}); a worker is running on pool "
              f"{pool!r}.")
        print(run_hint(api_url))
        while not stopping.is_set():
            if server.poll() is not None or worker.poll() is not None:
                print("server or worker exited; stopping", file=sys.stderr)
                return 1
            stopping.wait(1)
        return 0
    finally:
        if worker is not None:
            stop_group(worker)
            try:
                crashed = crash_in_flight(api_url, pool, "the worker was stopped (memlora serve ended) while the "
                                                        "run was in flight; rerun it: finished stages are kept")
            except Exception as err:  # noqa: BLE001  (the server may be gone already; nothing more to do)
                crashed = []
                print(f"could not mark runs in flight as crashed: {err}", file=sys.stderr)
            if crashed:
                print(f"marked crashed (stopped in flight): {', '.join(crashed)}", file=sys.stderr)
        stop_group(server)
