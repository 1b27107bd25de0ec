"""Crashes and full disks: distillation and a release SIGKILLed at three points each, then rerun; a real
full filesystem (a small tmpfs) under ingest and release. Nothing half-written is ever loaded or pointed at,
and what was finished before the crash is kept."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memlora.config import OPERATIONS, load_config
from memlora.data.ingest import ingest
from memlora.release import publish_release, verify_release
from memlora.student.build import build_student
from memlora.student.distill import cache_key
from memlora.student.experts import ExpertBackend, expert_folders
from tests.conftest import REPO
from tests.student_fixtures import distill_config, write_traces

PRUNE = {"prune": {"from": "teacher", "keep_layers": [0, 2]}}


def driver(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.crash_driver", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -9


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.timeout(600)
def test_distill_killed_at_three_points_resumes_without_half_written_experts(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    write_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir))
    path, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir), student=PRUNE, max_steps=4,
                                  batch_size=2, learning_rate=0.01, num_ranks=1, timeout_s=300)
    base = build_student(config, out)
    args = ("distill", str(path), str(out), str(base))
    adapters = out / "adapters"

    # 1. mid-training of the first expert
    first = driver(*args, "extraction:'loss'")
    assert killed(first), first.stdout[-2000:] + first.stderr[-2000:]
    assert expert_folders(out) == {}

    # 2. the first expert finished, the second mid-training
    second = driver(*args, "update:'loss'")
    assert killed(second) and "DONE extraction skipped=False" in second.stdout
    assert set(expert_folders(out)) == {"extraction"}
    extraction_bytes = (adapters / "extraction" / "adapter_model.safetensors").read_bytes()

    # 3. two finished, the third just launched
    third = driver(*args, "generation:launching")
    assert killed(third) and "DONE extraction skipped=True" in third.stdout and "DONE update skipped=False" in third.stdout
    assert set(expert_folders(out)) == {"extraction", "update"}

    # What a crash mid-save would leave: a partial staging folder and a final folder without weights. Neither
    # counts as an expert; the rerun replaces both.
    (adapters / ".staging-generation").mkdir()
    (adapters / ".staging-generation" / "adapter_model.safetensors").write_bytes(extraction_bytes[:100])
    (adapters / "generation").mkdir()
    shutil.copy(adapters / "extraction" / "adapter_config.json", adapters / "generation")
    assert set(expert_folders(out)) == {"extraction", "update"}

    final = driver(*args)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    assert "DONE extraction skipped=True" in final.stdout and "DONE update skipped=True" in final.stdout
    assert "DONE generation skipped=False" in final.stdout
    assert (adapters / "extraction" / "adapter_model.safetensors").read_bytes() == extraction_bytes  # kept
    assert hidden(adapters) == []
    for op in OPERATIONS:
        record = json.loads((adapters / op / "training.json").read_text())
        assert record["steps"] == 4  # each trained whole, from scratch, never resumed from a partial adapter
        assert record["cache_key"] == cache_key(config, out, op)["key"]
        assert sorted(p.name for p in (adapters / op).iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "training.json"]
    backend = ExpertBackend.from_out(base, out, device="cpu")  # every file checked against the manifest
    assert backend.operations == list(OPERATIONS)


def release_state(root: Path) -> dict:
    return {"latest": os.readlink(root / "latest"), "visible": sorted(p.name for p in root.iterdir()
                                                                      if not p.name.startswith("."))}


@pytest.mark.timeout(300)
def test_release_killed_at_three_points_never_moves_latest_to_a_partial_release(sample_path, tmp_path):
    config_path = REPO / "configs" / "default.yaml"
    config = load_config(config_path)
    out = tmp_path / "out"
    ingest(sample_path, out, config.data)
    first = publish_release(out, config, sample_path).path
    root = first.parent
    (out / "datasets" / "extra.parquet").write_bytes((out / "datasets" / "questions.parquet").read_bytes())

    for point in ("copy", "card", "link"):
        result = driver("release", str(config_path), str(sample_path), str(out), point)
        assert killed(result), result.stderr[-2000:]
        assert os.readlink(root / "latest") == first.name  # still the last complete release
        assert verify_release(root) == []
        for version in (p for p in root.iterdir() if not p.name.startswith(".") and p.name != "latest"):
            assert verify_release(version) == []  # whatever is visible is complete
    assert hidden(root)  # the killed publishers' leftovers, hidden from readers

    result = driver("release", str(config_path), str(sample_path), str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    latest = (root / "latest").resolve()
    assert latest != first.resolve() and verify_release(root) == []
    assert "datasets/extra.parquet" in {f["path"] for f in json.loads((latest / "manifest.json").read_text())["files"]}
    assert hidden(root) == []  # swept by the next publish


FULL_DISK = r"""
set -u
mount -t tmpfs -o size=1200k tmpfs "$OUT" || exit 77
memlora() { "$BIN/python" -m memlora.cli "$@"; }
memlora ingest --data "$DATA" --out "$OUT" > "$LOG/ingest1.txt" 2>&1 || exit 3
memlora release --data "$DATA" --out "$OUT" --config "$CONFIG" > "$LOG/release1.txt" 2>&1 || exit 4
# a file the latest release lacks, so the second release has to write (one with the same files publishes nothing)
cp "$OUT/datasets/questions.parquet" "$OUT/datasets/more.parquet"
(cd "$OUT" && find . \( -type f -o -type l \) -not -name .memlora.lock | sort | xargs -r sha256sum) > "$LOG/before.txt"
dd if=/dev/zero of="$OUT/filler" bs=4k 2>/dev/null
memlora ingest --data "$DATA2" --out "$OUT" > "$LOG/ingest2.txt" 2>&1; echo $? > "$LOG/ingest2.rc"
memlora release --data "$DATA2" --out "$OUT" --config "$CONFIG" > "$LOG/release2.txt" 2>&1; echo $? > "$LOG/release2.rc"
rm "$OUT/filler"
(cd "$OUT" && find . \( -type f -o -type l \) -not -name .memlora.lock | sort | xargs -r sha256sum) > "$LOG/after.txt"
readlink "$OUT/releases/embedded-default-traces/latest" > "$LOG/latest.txt"
ls -A "$OUT/releases/embedded-default-traces" "$OUT/datasets" > "$LOG/listing.txt"
"$BIN/python" -m memlora.cli verify "$OUT/releases/embedded-default-traces" > "$LOG/verify.txt" 2>&1 || exit 5
"""


@pytest.mark.timeout(180)
def test_a_full_disk_fails_clearly_and_keeps_the_previous_artifacts(sample_path, tmp_path):
    """A real full filesystem: a 1.2 MB tmpfs, mounted in a private mount namespace (`unshare`), so no root
    on the host is needed and nothing outlives the test."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` here to mount a private tmpfs")
    mount = tmp_path / "mnt"
    logs = tmp_path / "logs"
    mount.mkdir()
    logs.mkdir()
    # Different content (one more conversation) so the second ingest and release really have to write.
    data2 = tmp_path / "more.json"
    samples = json.loads(sample_path.read_text())
    extra = json.loads(json.dumps(samples[0]))
    extra["sample_id"] = "extra-copy"
    data2.write_text(json.dumps(samples + [extra]))
    env = dict(os.environ, OUT=str(mount), LOG=str(logs), DATA=str(sample_path), DATA2=str(data2),
               CONFIG=str(REPO / "configs" / "default.yaml"), BIN=str(Path(sys.executable).parent))
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]  # -r: a user namespace, no root
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private mount namespace here: {probe.stderr.strip()}")
    result = subprocess.run([*prefix, "bash", "-c", FULL_DISK], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=150)
    if result.returncode == 77:
        pytest.skip("tmpfs cannot be mounted here")
    detail = result.stderr + "".join(f"\n--- {p.name}\n{p.read_text()}" for p in sorted(logs.iterdir()))
    assert result.returncode == 0, detail

    for step in ("ingest2", "release2"):
        assert (logs / f"{step}.rc").read_text().strip() == "1", detail
        message = (logs / f"{step}.txt").read_text()
        assert "No space left on device" in message and "Traceback" not in message, detail
    assert "error:" in (logs / "ingest2.txt").read_text()
    # Everything that was there before is byte for byte the same, `latest` included; no temp file is left.
    assert (logs / "after.txt").read_text() == (logs / "before.txt").read_text(), detail
    assert not [n for n in (logs / "listing.txt").read_text().split() if n.startswith(".")], detail
    assert "matches its manifest" in (logs / "verify.txt").read_text()
