"""A task fails mid-pipeline; the rerun completes without recomputing what had finished: no conversation is
traced again (the teacher is not even loaded) and a finished expert is kept, not trained again.

Training goes through the stand-in launcher of test_distill_flow (a real, untrained DeLoRA adapter): what is
under test is what the pipeline skips, and the real launch has its own tests."""

from __future__ import annotations

import json

import pytest

from memlora.config import OPERATIONS
from memlora.student.launch import TrainingFailed
from tests.test_deployments import tiny_config
from tests.test_distill_flow import fake_run_trainings


def snapshot(out) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every trace shard and adapter file: a rewrite changes both."""
    files = [*sorted((out / "traces").rglob("*.parquet")), *sorted((out / "adapters").rglob("*"))]
    return {str(f.relative_to(out)): (f.stat().st_ino, f.stat().st_mtime_ns) for f in files if f.is_file()}


@pytest.mark.prefect
@pytest.mark.timeout(900)
def test_failed_task_then_rerun_skips_finished_work(prefect_server, tiny_model_dir, sample_path, tmp_path,
                                                    monkeypatch):
    import memlora.teacher.traces as traces_module
    import memlora.student.distill as distill_module
    from memlora.flows.pipeline import pipeline

    config = str(tiny_config(tmp_path / "tiny.yaml", tiny_model_dir))
    out = tmp_path / "out"
    trained: list[str] = []
    fake = fake_run_trainings(trained)

    def fail_second(config, out, base, jobs, on_line=print, on_record=lambda record: None):
        fake(config, out, base, jobs[:1], on_line, on_record)  # the launch trains the first expert, then dies
        trained.append("failed")
        raise TrainingFailed("deliberate failure of the second expert's training")

    monkeypatch.setattr(distill_module, "run_trainings", fail_second)
    with pytest.raises(Exception, match="deliberate failure"):
        pipeline(config_path=config, data=str(sample_path), out=str(out))
    first_expert = trained[0]
    assert trained == [first_expert, "failed"]
    assert not (out / "eval").exists() and not (out / "releases").exists()  # nothing after the failed task ran
    before = snapshot(out)
    assert any(k.startswith("traces/") for k in before) and f"adapters/{first_expert}/adapter_model.safetensors" in before

    teachers_built = []
    real_build = traces_module.build_backend
    monkeypatch.setattr(traces_module, "build_backend", lambda cfg: teachers_built.append(cfg) or real_build(cfg))
    monkeypatch.setattr(distill_module, "run_trainings", fake)
    summary = pipeline(config_path=config, data=str(sample_path), out=str(out))

    assert teachers_built == []  # every conversation's shards were complete: nothing traced again
    assert summary["distill"][first_expert].get("skipped") is True
    assert first_expert not in trained[2:]  # the rerun trained only what had not finished
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before  # finished files untouched
    assert (out / "eval" / "results.parquet").is_file()
    assert (out / "releases").is_dir() and summary["release"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["distill"]["experts"]) == set(OPERATIONS)

    # Nothing changed since: every stage is kept, and the release stands (no new version, no copy of the data)
    again = pipeline(config_path=config, data=str(sample_path), out=str(out))
    assert again["release"] == summary["release"]
    versions = [p.name for p in (out / "releases").glob("*/*") if p.name != "latest"]
    assert versions == [again["release"].rsplit("/", 1)[-1]]
