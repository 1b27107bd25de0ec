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

REPO = Path.cwd()  # the checkout holding prefect.yaml: `make serve` and the tests run from its root
BIN = Path(sys.executable).parent


def prefect_env(api_url: str, **extra: str) -> dict:
    env = dict(os.environ, **OFFLINE_ENV, PREFECT_API_URL=api_url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PWD=str(REPO))
    env.update(extra)
    return env


def wait_healthy(api_url: str, proc: subprocess.Popen | None = None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server {proc.args[1:3] if isinstance(proc.args, list) else proc.args} exited "
                               f"with code {proc.returncode}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{api_url} not healthy after {timeout_s:.0f} s")


def prefect(args: list[str], env: dict, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)


def ensure_pool(pool: str, env: dict) -> None:
    if prefect(["work-pool", "inspect", pool], env).returncode != 0:
        done = prefect(["work-pool", "create", pool, "--type", "process"], env)
        if done.returncode != 0:
            raise RuntimeError(f"could not create work pool {pool}: {done.stdout}{done.stderr}")


def deploy_all(env: dict) -> str:
    done = prefect(["--no-prompt", "deploy", "--all"], env)
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def deployed_summary(output: str) -> str:
    """Prefect's deploy output, less its advice to start a worker (serve has started one) and its
    `prefect deployment run` hints (which need this venv's prefect and PREFECT_API_URL: see run_hint)."""
    names = [line.strip() for line in output.splitlines() if "Deployment '" in line]
    return "\n".join(names) if names else output


def run_hint(api_url: str) -> str:
    """Commands that work as printed in a fresh shell (no venv activated, no PREFECT_API_URL exported)."""
    prefect_bin = BIN / "prefect"
    return (f"Run the pipeline now, from another shell:\n"
            f"  PREFECT_API_URL={api_url} {prefect_bin} deployment run 'memlora-pipeline/embedded-default' --watch\n"
            f"List scheduled runs:\n"
            f"  PREFECT_API_URL={api_url} {prefect_bin} flow-run ls --state SCHEDULED\n"
            f"Ctrl-C here stops the server and the worker.")


def start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "prefect"), *args], env=env, cwd=REPO, stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def serve(host: str = "127.0.0.1", port: int = 4200, pool: str = "memlora-pool", deploy: bool = True) -> int:
    api_url = f"http://{host}:{port}/api"
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
        print(f"Prefect UI and API at http://{host}:{port} (logs in {logs}); a worker is running on pool {pool!r}.")
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
        stop_group(server)
