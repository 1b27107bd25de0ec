"""The embedded default's config and sample (and `memlora serve` its prefect.yaml) are found from any working
directory, as a team runs the commands from wherever it keeps its OUT; a file of the same name in the working
directory (a user's own copy) wins."""

from __future__ import annotations

import os
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


@pytest.mark.timeout(60)
def test_extends_names_a_bundled_config_from_a_folder_of_ones_own(tmp_path):
    """The README's `extends: default.yaml` in a team's own folder is the embedded default (a file of that name
    beside the config still wins); a name that is nowhere says which file asked for it and what is bundled."""
    from memlora.config import ConfigError, load_config

    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: default.yaml\nteacher: {batch_size: 4}\n")
    config = load_config(mine)
    assert (config.name, config.teacher.batch_size) == ("embedded-default", 4)
    assert config.teacher.model == load_config(REPO / "configs" / "default.yaml").teacher.model
    (tmp_path / "locomo-mine.yaml").write_text("extends: locomo.yaml\n")  # locomo.yaml extends default.yaml in turn
    assert load_config(tmp_path / "locomo-mine.yaml").name == load_config(REPO / "configs" / "locomo.yaml").name
    (tmp_path / "default.yaml").write_text(f"extends: {REPO / 'configs' / 'default.yaml'}\nname: own-default\n")
    assert (load_config(mine).name, load_config(mine).teacher.batch_size) == ("own-default", 4)
    for name in ("default", "configs/default.yaml"):  # without its .yaml; as the checkout names it
        (tmp_path / "short.yaml").write_text(f"extends: {name}\n")
        assert load_config(tmp_path / "short.yaml").name == "embedded-default"
    (tmp_path / "typo.yaml").write_text("extends: defualt.yaml\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: extends: 'defualt.yaml' is neither a file beside it "
                       r"\(.*defualt.yaml\) nor a bundled config \(default.yaml, locomo.yaml, mem0.yaml\)"):
        load_config(tmp_path / "typo.yaml")


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


@pytest.mark.timeout(180)
def test_a_prefect_yaml_that_does_not_deploy_is_prefects_own_words_and_none_of_ours(tmp_path):
    """The working directory's prefect.yaml is the one served; where `prefect deploy` refuses it, the command
    says so with Prefect's message, stops its server, and exits 1."""
    from tests.conftest import free_port

    (tmp_path / "prefect.yaml").write_text("deployments:\n  - name: broken\n    entrypoint: nowhere.py:nothing\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # its own database, not the shared test server's
    done = subprocess.run([str(BIN / "memlora"), "serve", "--port", str(free_port())], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 1 and done.stderr.startswith("memlora serve: error: prefect deploy --all failed"), \
        done.stdout[-2000:] + done.stderr[-2000:]
    assert "memlora/cli.py" not in done.stderr and "nowhere.py" in done.stderr  # Prefect's words, none of ours
