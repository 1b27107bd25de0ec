"""serve-experts takes a new version of its experts without a restart: requests in flight during the swap all
succeed, answers after it are the new experts', the earlier version comes back the same way, and a version whose
files do not match the manifest is refused while the current experts keep serving (tiny random model, real
uvicorn, 127.0.0.1 only, bounded loops)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from memlora.llm.openai_server import ServingEngine, create_app, expert_models
from memlora.llm.reload import Reloader, experts_version
from memlora.manifest import update_manifest
from memlora.memory.llm import GenerationRequest
from memlora.student.experts import ExpertBackend, verified_expert_folders
from tests.serving_fixtures import running
from tests.student_fixtures import saved_expert

PROMPT = [{"role": "user", "content": "Ann: I moved to Porto and I have a cat."}]


def install(out: Path, version: Path) -> None:
    """What a promotion does to OUT: the adapter files replaced one by one, then the manifest rewritten."""
    target = out / "adapters" / "extraction"
    target.mkdir(parents=True, exist_ok=True)
    for f in version.iterdir():
        shutil.copy(f, target / f".{f.name}.tmp")
        os.replace(target / f".{f.name}.tmp", target / f.name)
    update_manifest(out)


def answer_of(tiny_model_dir: Path, folder: Path) -> str:
    backend = ExpertBackend(tiny_model_dir, {"extraction": folder}, device="cpu")
    return backend.generate([GenerationRequest("extraction", PROMPT, 12)])[0].text


@pytest.mark.timeout(300)
def test_a_new_version_is_taken_under_load_without_failing_a_request(tmp_path, tiny_model_dir):
    v1 = saved_expert(tiny_model_dir, tmp_path / "v1", seed=1)
    v2 = saved_expert(tiny_model_dir, tmp_path / "v2", seed=2)
    expected = {"v1": answer_of(tiny_model_dir, v1), "v2": answer_of(tiny_model_dir, v2)}
    assert expected["v1"] != expected["v2"]
    out = tmp_path / "out"
    install(out, v1)

    compiled = {}

    def load() -> dict:  # as serve-experts reloads: the serving backend's compiled grammars kept
        backend = ExpertBackend(tiny_model_dir, verified_expert_folders(out), device="cpu",
                                grammars=compiled.get("grammars"))
        compiled["grammars"] = backend.grammars
        return {"backend": backend, "models": expert_models(backend.operations)}

    first = load()["backend"]
    grammars = first.grammars
    engine = ServingEngine(first, expert_models(first.operations), default_max_tokens=12)
    replaced = weakref.ref(first)
    del first
    engine.reloader = Reloader(lambda: experts_version(out), load, engine.swap, interval_s=0.1)
    body = {"model": "memlora-extraction", "messages": PROMPT, "max_tokens": 12, "temperature": 0}

    def ask(url: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)

    def streamed(url: str) -> tuple[int, str | None]:
        """A stream sent token by token: its status, and its joined text where it ended with [DONE]."""
        got = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60)
        events = [e[6:] for e in got.text.split("\n\n") if e.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return got.status_code, None
        return got.status_code, "".join(json.loads(e)["choices"][0]["delta"].get("content") or ""
                                        for e in events[:-1] if json.loads(e)["choices"])

    def health(url: str) -> dict:
        return httpx.get(f"{url}/health").json()["experts"]

    def wait_for(url: str, reloads: int, refused: int = 0) -> None:
        deadline = time.monotonic() + 60
        while (health(url)["reloads"], health(url)["refused"]) != (reloads, refused):
            assert time.monotonic() < deadline, health(url)
            time.sleep(0.05)

    with running(create_app(engine)) as url:
        assert ask(url).json()["choices"][0]["message"]["content"] == expected["v1"]
        statuses, texts, stop = [], [], threading.Event()

        def client() -> None:
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(ask(url).status_code)

        def stream_client() -> None:  # token-by-token streams in flight across the swap end whole too
            deadline = time.monotonic() + 90
            while not stop.is_set() and time.monotonic() < deadline:
                status, text = streamed(url)
                statuses.append(status)
                texts.append(text)

        with ThreadPoolExecutor(4) as pool:
            clients = [pool.submit(client) for _ in range(2)] + [pool.submit(stream_client) for _ in range(2)]
            time.sleep(0.5)
            install(out, v2)  # promoted while 4 clients keep asking
            wait_for(url, 1)
            time.sleep(0.5)
            stop.set()
            for c in clients:
                c.result()
        assert len(statuses) > 8 and set(statuses) == {200}, statuses
        assert set(texts) == {expected["v1"], expected["v2"]}, texts  # streams of both versions, each whole
        assert ask(url).json()["choices"][0]["message"]["content"] == expected["v2"]
        assert engine.backend is not replaced() and engine.backend.grammars is grammars
        deadline = time.monotonic() + 60  # the replaced experts are freed once their queue drained (memory back)
        while replaced() is not None:
            assert time.monotonic() < deadline, "the replaced backend is still referenced"
            time.sleep(0.2)

        install(out, v1)  # the earlier version back: its answers back
        wait_for(url, 2)
        assert ask(url).json()["choices"][0]["message"]["content"] == expected["v1"]

        manifest = json.loads((out / "manifest.json").read_text())
        for entry in manifest["files"]:  # a version whose adapter does not match what its manifest lists
            if entry["path"].endswith("adapter_model.safetensors"):
                entry["sha256"] = "0" * 64
        (out / "manifest.json").write_text(json.dumps(manifest))
        wait_for(url, 2, refused=1)
        assert "UntrustedArtifact" in health(url)["last_error"]
        assert ask(url).json()["choices"][0]["message"]["content"] == expected["v1"]  # still the current experts
    engine.close()


@pytest.mark.timeout(120)
def test_new_thresholds_alone_swap_the_policy_and_keep_the_loaded_experts(tmp_path, tiny_model_dir):
    """Every night's recalibration rewrites deferral.json: the server takes the new thresholds without loading a
    second copy of the experts; a new adapter file still loads them."""
    from memlora.config import DeferralConfig
    from memlora.evaluation.calibration import DeferralPolicy
    from memlora.llm.fallback import Fallback
    from memlora.llm.reload import ExpertsLoader
    from memlora.teacher.capture import CaptureRecorder

    out = tmp_path / "out"
    install(out, saved_expert(tiny_model_dir, tmp_path / "v1", seed=1))
    thresholds = out / "deferral.json"
    thresholds.write_text(json.dumps({"operations": {"extraction": {"keep": {"value": 1e9}}}}))
    loads = []

    def experts() -> dict:
        loads.append(1)
        backend = ExpertBackend(tiny_model_dir, verified_expert_folders(out), device="cpu")
        return {"backend": backend, "models": expert_models(backend.operations)}

    first = experts()["backend"]
    fallback = Fallback("http://127.0.0.1:9/v1", "teacher", DeferralPolicy.read(thresholds),
                        CaptureRecorder(tmp_path / "rec"), DeferralConfig())
    engine = ServingEngine(first, expert_models(first.operations), default_max_tokens=12, fallback=fallback)
    loader = ExpertsLoader(out, experts, lambda: DeferralPolicy.read(thresholds))
    reloader = Reloader(lambda: experts_version(out, [thresholds]), loader, engine.swap, interval_s=60)

    import asyncio

    thresholds.write_text(json.dumps({"operations": {"extraction": {"keep": {"value": -1.0}}}}))
    assert asyncio.run(reloader.check())
    assert engine.backend is first and len(loads) == 1  # the experts serving stay; no second copy was loaded
    assert engine.fallback.policy.keeps("extraction", 0.0)
    install(out, saved_expert(tiny_model_dir, tmp_path / "v2", seed=2))
    assert asyncio.run(reloader.check())
    assert engine.backend is not first and len(loads) == 2 and engine.fallback.policy.keeps("extraction", 0.0)
    engine.close()


@pytest.mark.timeout(120)
def test_thresholds_fitted_on_other_experts_defer_everything_until_refitted(tmp_path, tiny_model_dir):
    """A threshold holds its budget only for the expert it was fitted on: where a distill or a rollback replaced
    that expert, the served policy drops it (every call of the operation goes to the teacher, said at /health) until
    the thresholds name the new expert; a file that names no expert (written before they were recorded) applies."""
    from memlora.config import DeferralConfig
    from memlora.evaluation.calibration import DeferralPolicy
    from memlora.llm.fallback import Fallback
    from memlora.llm.reload import ExpertsLoader
    from memlora.student.experts import expert_digests
    from memlora.teacher.capture import CaptureRecorder

    out = tmp_path / "out"
    v1, v2 = (saved_expert(tiny_model_dir, tmp_path / name, seed=seed) for name, seed in (("v1", 1), ("v2", 2)))
    install(out, v1)
    thresholds = out / "deferral.json"

    def fitted_on(folder: Path | None) -> None:
        named = {"experts": expert_digests({"extraction": folder})} if folder is not None else {}
        thresholds.write_text(json.dumps({"operations": {"extraction": {"keep": {"value": -1.0}}}, **named}))

    def experts() -> dict:
        backend = ExpertBackend(tiny_model_dir, verified_expert_folders(out), device="cpu")
        return {"backend": backend, "models": expert_models(backend.operations)}

    fitted_on(v1)
    first = experts()["backend"]
    assert first.digests == expert_digests({"extraction": v1})
    fallback = Fallback("http://127.0.0.1:9/v1", "teacher", DeferralPolicy.read(thresholds),
                        CaptureRecorder(tmp_path / "rec"), DeferralConfig())
    engine = ServingEngine(first, expert_models(first.operations), default_max_tokens=12, fallback=fallback)
    reloader = Reloader(lambda: experts_version(out, [thresholds]),
                        ExpertsLoader(out, experts, lambda: DeferralPolicy.read(thresholds)), engine.swap,
                        interval_s=60)
    assert engine.fallback.policy.keeps("extraction", 0.0) and not engine.straight_to_teacher("extraction")

    import asyncio

    install(out, v2)  # e.g. `memlora distill` retrained it on the day's deferred calls: thresholds not refitted
    assert asyncio.run(reloader.check()) and engine.backend is not first
    assert engine.fallback.policy.stale == ["extraction"] and engine.straight_to_teacher("extraction")
    assert not engine.fallback.policy.keeps("extraction", 0.0)
    assert engine.health()["deferral"]["stale_thresholds"] == ["extraction"]
    fitted_on(v2)  # recalibrated for the expert that serves
    assert asyncio.run(reloader.check())
    assert engine.fallback.policy.stale == [] and engine.fallback.policy.keeps("extraction", 0.0)
    fitted_on(None)  # a file from before experts were named: applied as it is
    assert asyncio.run(reloader.check()) and engine.fallback.policy.keeps("extraction", 0.0)
    engine.close()
