import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from memlora.config import load_config
from memlora.data.ingest import ingest
from memlora.release import publish_release, verify_release
from tests.conftest import REPO


@pytest.fixture
def released(sample_path, tmp_path):
    config = load_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    ingest(sample_path, out, config.data)
    return out, config, publish_release(out, config, sample_path).path


def test_release_has_card_manifest_and_latest(released, sample_path):
    out, config, release = released
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["schema_version"] == "1"
    assert set(manifest["prompt_template_hashes"]) == {"extraction", "update", "generation"}
    assert manifest["teacher_model"] == config.teacher.model
    assert len(manifest["source_data"]["sha256"]) == 64
    assert {f["path"] for f in manifest["files"]} == {"datasets/conversations.parquet", "datasets/questions.parquet"}
    latest = release.parent / "latest"
    assert latest.is_symlink() and latest.resolve() == release.resolve()
    card = (release / "README.md").read_text()
    assert "load_dataset" in card and "pq.read_table" in card and "adversarial_answer" in card
    assert not [p for p in release.parent.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert verify_release(release) == []
    assert verify_release(release.parent) == []  # via `latest`
    assert "**eval**" not in card  # only what the release holds is described


def test_verify_out_is_clean_with_releases_and_the_card_describes_eval(released, sample_path):
    from memlora.manifest import update_manifest

    out, config, _ = released
    (out / "eval").mkdir()
    shutil.copy2(out / "datasets" / "questions.parquet", out / "eval" / "results.parquet")  # any Parquet file
    update_manifest(out)
    release = publish_release(out, config, sample_path).path
    assert verify_release(out) == []  # OUT's manifest covers OUT; each release is verified on its own
    assert verify_release(release) == []
    card = (release / "README.md").read_text()
    assert "**eval**" in card and "eval/results.parquet" in card


def test_verify_names_every_difference(released):
    _, _, release = released
    questions = release / "datasets" / "questions.parquet"
    table = pq.read_table(questions)
    pq.write_table(table.slice(0, 3), questions)  # fewer rows, other bytes
    (release / "datasets" / "conversations.parquet").unlink()
    pq.write_table(table, release / "datasets" / "extra.parquet")
    problems = verify_release(release)
    assert any("questions.parquet: sha256" in p for p in problems)
    assert any("conversations.parquet: missing" in p for p in problems)
    assert any("extra.parquet: present but not in the manifest" in p for p in problems)
    proc = subprocess.run([sys.executable, "-m", "memlora.cli", "verify", str(release)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "3 difference(s)" in proc.stderr
    usage = subprocess.run([sys.executable, "-m", "memlora.cli", "verify", "--help"], capture_output=True, text=True,
                           timeout=120)
    assert "OUT/releases/<name>/<version>" in usage.stdout.replace("\n", " ").replace("  ", " ")


def test_verify_names_a_file_the_manifest_does_not_list_whatever_its_kind(released, sample_path):
    """Not only Parquet: an extra file under an OUT's adapters/ or in a release is a difference (the manifest
    covers every file of what it describes)."""
    from memlora.manifest import update_manifest

    out, _, release = released
    (out / "adapters" / "update").mkdir(parents=True)
    (out / "adapters" / "update" / "adapter_config.json").write_text("{}")
    update_manifest(out)
    assert verify_release(out) == []
    (out / "adapters" / "update" / "extra.bin").write_bytes(b"not in the manifest")
    (release / "notes.txt").write_text("added after publishing")
    assert verify_release(out) == ["adapters/update/extra.bin: present but not in the manifest"]
    assert verify_release(release) == ["notes.txt: present but not in the manifest"]


def test_second_release_moves_latest_only_when_complete(released, sample_path, monkeypatch):
    out, config, first = released
    import memlora.release as rel

    def broken_card(manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rel, "dataset_card", broken_card)
    shutil.copy2(out / "datasets" / "questions.parquet", out / "datasets" / "extra.parquet")  # new content
    with pytest.raises(OSError):
        publish_release(out, config, sample_path)
    assert (first.parent / "latest").resolve() == first.resolve()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, "latest"])
    assert os.path.isdir(first)


def test_a_rerun_with_the_same_files_publishes_nothing_new(released, sample_path, tmp_path):
    """A nightly rerun that changed nothing: the latest release stands (no new version, no copy); a changed file
    or a latest release that no longer matches its manifest publishes a new one."""
    out, config, first = released
    again = publish_release(out, config, sample_path)
    assert again.path == first and not again.new
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, "latest"])
    cli = [sys.executable, "-m", "memlora.cli", "release", "--config", str(REPO / "configs" / "default.yaml"),
           "--data", str(sample_path), "--out", str(out)]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "unchanged" in proc.stdout and first.name in proc.stdout, proc.stdout + proc.stderr

    shutil.copy2(out / "datasets" / "questions.parquet", out / "datasets" / "extra.parquet")
    second = publish_release(out, config, sample_path)
    assert second.new and second.path != first and (first.parent / "latest").resolve() == second.path.resolve()

    (second.path / "datasets" / "extra.parquet").write_bytes(b"changed after publishing")
    third = publish_release(out, config, sample_path)  # the same files as OUT's, but latest is not what it says
    assert third.new and third.path not in (first, second.path) and verify_release(third.path) == []
    assert verify_release(first) == []


def test_an_out_of_captured_calls_is_released_without_data(tmp_path):
    """A team's captured calls are their own source: `memlora release` without --data on such an OUT; on an OUT
    made from conversations --data stays required (one line, exit 2, nothing written)."""
    from memlora.config import CaptureConfig, CaptureRule
    from memlora.teacher.capture import CaptureRecorder

    out = tmp_path / "captured"
    recorder = CaptureRecorder.from_config(out, CaptureConfig(test_ratio=0.25, test_block=2))
    rule = CaptureRule(operation="extraction", model="teacher")
    answer = {"choices": [{"message": {"content": '{"facts": ["likes tea"]}'}, "finish_reason": "stop"}], "usage": {}}
    for i in range(4):
        recorder.write(recorder.row(rule, [{"role": "user", "content": f"call {i}"}], None, answer, 0.1, "conv-a", 0))
    cli = [sys.executable, "-m", "memlora.cli", "release", "--config", str(REPO / "configs" / "default.yaml"),
           "--out", str(out)]
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    release = (out / "releases" / "embedded-default-traces" / "latest").resolve()
    manifest = json.loads((release / "manifest.json").read_text())
    assert manifest["source_data"] == {"path": None, "sha256": None, "kind": "captured calls"}
    assert {f["path"].split("/")[1] for f in manifest["files"]} == {"extraction"} and verify_release(release) == []
    card = (release / "README.md").read_text()
    assert "recorded by `memlora capture`" in card and "users' text" in card

    ingested = tmp_path / "ingested"
    ingest(REPO / "data" / "samples" / "locomo_sample12.json", ingested, load_config(REPO / "configs" /
                                                                                    "default.yaml").data)
    cli[cli.index(str(out))] = str(ingested)
    proc = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data: required" in proc.stderr and not (ingested / "releases").exists()
