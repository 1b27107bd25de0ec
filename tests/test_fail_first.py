"""Commands refuse at once, before any expensive step, when an input they will need is missing."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(60)
def test_evaluate_without_experts_refuses_before_building_anything(sample_path, tmp_path):
    from memlora.config import load_config
    from memlora.data.ingest import ingest
    from memlora.evaluation.plan import prepare
    from memlora.evaluation.systems import EvalError
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    ingest(str(sample_path), out, config.data)
    with pytest.raises(EvalError, match="no trained expert"):
        prepare(config, out)
    assert not (out / "student").exists()  # the student base was not built first


@pytest.mark.timeout(60)
def test_evaluate_refuses_experts_that_trained_on_a_test_conversation(sample_path, tmp_path, capsys):
    """Another corpus ingested into a trained OUT moves conversations between splits: an expert that learnt from
    one now held out for test would flatter the report. Evaluation names it, before any model loads."""
    import json

    from memlora.config import load_config
    from memlora.data.ingest import ingest
    from memlora.evaluation.plan import prepare
    from memlora.evaluation.systems import EvalError
    from memlora.manifest import update_manifest
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    test_ids = [c.conversation_id for c in ingest(str(sample_path), out, config.data) if c.split == "test"]
    expert = out / "adapters" / "update"
    expert.mkdir(parents=True)
    (expert / "adapter_config.json").write_text("{}")
    (expert / "adapter_model.safetensors").write_bytes(b"stand-in: prepare reads the record, not the weights")
    (expert / "training.json").write_text(json.dumps({"operation": "update", "train_conversations": [test_ids[0]],
                                                      "validation_conversations": []}))
    update_manifest(out)
    with pytest.raises(EvalError, match=f"the update expert trained on test conversation\\(s\\) {test_ids[0]}; run "
                                        "`memlora distill`"):
        prepare(config, out)
    assert not (out / "student").exists()
    from memlora.cli import main  # the command checks before Prefect starts: one line, no flow's traceback

    assert main(["evaluate", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memlora evaluate: error: ") and "test conversation" in lines[0]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["traces", "run"])
def test_bad_data_through_a_flow_command_is_one_line_before_any_flow(command, tmp_path):
    import subprocess

    from tests.conftest import BIN, REPO

    bad = REPO / "tests" / "data" / "bad" / "qa_no_answer.json"
    done = subprocess.run([str(BIN / "memlora"), command, "--data", str(bad), "--out", str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=100)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"memlora {command}: error: ") and str(bad) in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


@pytest.mark.timeout(120)
def test_out_pointing_at_a_file_is_one_line_and_exit_2(tmp_path):
    import subprocess

    from tests.conftest import BIN, REPO

    file = tmp_path / "notafolder"
    file.write_text("x")
    done = subprocess.run([str(BIN / "memlora"), "distill", "--out", str(file)], cwd=REPO, capture_output=True,
                          text=True, timeout=100)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"memlora distill: error: --out {file}: is a file; OUT must be a folder")
    assert file.read_text() == "x"


@pytest.mark.timeout(120)
def test_a_flow_on_a_missing_out_fails_and_creates_nothing(tmp_path, capsys):
    """A mistyped OUT in a nightly `improve` used to end 'no new trace rows' with exit 0, every night; distill and
    evaluate left an empty OUT holding a lock file. The command and the flow itself (a deployment's run) refuse."""
    from memlora.cli import main
    from memlora.flows.improve import improve
    from memlora.outlock import OutMissing

    missing = tmp_path / "typo"
    for command in ("improve", "distill", "evaluate"):
        assert main([command, "--out", str(missing)]) == 2
        assert capsys.readouterr().err.strip() == (
            f"memlora {command}: error: {missing}: no such folder (give the OUT that `memlora run`, `memlora traces` "
            f"or `memlora capture` wrote; {command} works on what is in it)")
    with pytest.raises(OutMissing, match="no such folder"):
        improve.fn(out=str(missing))
    assert not missing.exists()


def _one_conversation(sample_path, tmp_path):
    import json

    from memlora.data.loaders import load_corpus

    conversation = load_corpus(sample_path)[0]
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"type": "turn", "conversation_id": conversation.conversation_id,
                                       "session": t.session, "turn": t.turn, "speaker": t.speaker, "text": t.text,
                                       "time": t.time.isoformat()}) + "\n" for t in conversation.turns))
    return one


@pytest.mark.timeout(60)
def test_a_corpus_that_holds_nothing_out_for_test_is_refused_before_the_pipeline(sample_path, tmp_path, capsys):
    """One conversation always trains: `memlora run` used to trace and train on it for minutes, then fail in the
    evaluation with a traceback. It refuses first, creating no OUT (the flow itself: the next test)."""
    from memlora.cli import main

    out = tmp_path / "out"
    assert main(["run", "--data", str(_one_conversation(sample_path, tmp_path)), "--out", str(out)]) == 2
    assert "1 conversation(s), and the config's data.split holds none out" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.timeout(240)
def test_the_pipeline_flow_refuses_a_corpus_that_holds_nothing_out_for_test(sample_path, tmp_path, prefect_server):
    """A deployment's run of memlora-pipeline with such data. (No capsys here: a flow run under it would bind
    Prefect's console log handler to a stream that pytest closes, and later flows' logging would fail.)"""
    from memlora.data.io import DataError
    from memlora.flows.pipeline import pipeline
    from tests.conftest import REPO

    out = tmp_path / "out"
    with pytest.raises(DataError, match="holds none out for the evaluation"):
        pipeline(config_path=str(REPO / "configs" / "default.yaml"), data=str(_one_conversation(sample_path, tmp_path)),
                 out=str(out))
    assert not out.exists()


@pytest.mark.timeout(120)
def test_a_server_whose_address_or_teacher_url_is_wrong_refuses_before_loading_anything(tmp_path, capsys):
    import socket
    from types import SimpleNamespace

    from memlora.cli import main
    from tests.conftest import free_port

    def memlora(*args: str) -> SimpleNamespace:
        """The command line in this process (each subprocess would cost seconds of imports)."""
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's own errors
            code = exit.code
        return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for command in (["serve-model"], ["serve-experts", "--out", str(tmp_path / "out")]):
            done = memlora(*command, "--port", str(port))
            assert done.returncode == 2 and done.stderr.strip() == (
                f"memlora {command[0]}: error: --host 127.0.0.1 --port {port}: cannot listen there (Address already "
                "in use); choose another port"), done.stderr  # one line: no model was loaded first
    done = memlora("serve-model", "--port", "99999")
    assert done.returncode == 2 and "argument --port: 99999: a port is 1-65535" in done.stderr, done.stderr
    for command in (["serve-model", "--max-tokens", "0"], ["export", "--out", "x", "--rank", "-4"],
                    ["evaluate", "--out", "x", "--sessions", "0"]):
        done = memlora(*command)
        assert done.returncode == 2 and done.stderr.strip().endswith(
            f"argument {command[-2]}: {command[-1]}: must be 1 or more"), done.stderr
    for command in (["capture", "--upstream"], ["serve-experts", "--fallback"]):  # the teacher's URL, before all
        done = memlora(*command, "127.0.0.1:8000/v1", "--out", str(tmp_path / "out"))
        assert done.returncode == 2 and done.stderr.strip().endswith(
            f"argument {command[1]}: '127.0.0.1:8000/v1': expected an http(s) URL such as http://127.0.0.1:8000/v1"
        ), done.stderr
    # Bound beyond this machine (configured): said out loud, with whether a key is asked, before anything else
    done = memlora("serve-experts", "--out", str(tmp_path / "out"), "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2 and done.stderr.splitlines()[0] == (
        "warning: --host 0.0.0.0: other machines can reach this server, and it asks them for no key (--api-key-env)")
    assert "no trained expert" in done.stderr.splitlines()[1]
    assert not (tmp_path / "out").exists()
