"""The embedded default's config and sample (and `memlora serve` its prefect.yaml) are found from any working
directory, as a team runs the commands from wherever it keeps its OUT; a file of the same name in the working
directory (a user's own copy) wins."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import BIN, REPO


@pytest.mark.timeout(60)
def test_the_defaults_resolve_to_the_installed_copies_outside_the_repository(tmp_path, monkeypatch):
    from memlora.bundled import DEFAULT_CONFIG, DEFAULT_DATA, bundled
    from memlora.config import load_config
    from memlora.data.loaders import LoadOptions, load_corpus

    monkeypatch.chdir(tmp_path)
    config, data = bundled(DEFAULT_CONFIG), bundled(DEFAULT_DATA)
    assert config == str(REPO / DEFAULT_CONFIG) and load_config(config).name == "embedded-default"
    assert len(load_corpus(data, LoadOptions())) == 12
    (tmp_path / "configs").mkdir()
    (tmp_path / DEFAULT_CONFIG).write_text("name: mine\n")
    assert bundled(DEFAULT_CONFIG) == DEFAULT_CONFIG  # the user's own copy, as the relative path it was given


@pytest.mark.timeout(120)
def test_commands_run_from_another_folder_take_the_embedded_config(tmp_path):
    (tmp_path / "empty").mkdir()

    def memlora(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "memlora"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=100)

    done = memlora("calibrate", "--out", "empty")  # past the config: it stops at the missing experts
    assert done.returncode == 2 and done.stderr.strip() == (
        "memlora calibrate: error: empty/adapters: no trained expert (run `memlora distill` first)"), done.stderr
    # An OUT with nothing to release says so (not that --data is missing), and nothing is written
    done = memlora("release", "--out", "nothing")
    assert done.returncode == 2 and done.stderr.strip() == (
        "memlora release: error: nothing: no Parquet datasets to release (run `memlora run`, or `memlora traces` "
        "or `memlora capture`, into it first)"), done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.timeout(60)
def test_memlora_serve_finds_its_deployments_from_another_folder(tmp_path, monkeypatch):
    from memlora.serve import checkout

    monkeypatch.chdir(tmp_path)
    assert checkout() == REPO  # the checkout's prefect.yaml, not "no such file" in the working directory
    (tmp_path / "prefect.yaml").write_text("deployments: []\n")
    assert checkout() == tmp_path  # a project's own prefect.yaml wins
