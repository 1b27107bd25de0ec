import pytest

from memlora.config import HttpConfig, LLMConfig
from memlora.llm.http_backend import OpenAIBackend, SchemaRejected, TeacherUnavailable
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema
from tests.stub_openai import StubOpenAI

SCHEMA = extraction_schema(4, 100)


def backend(url, **http):
    http = {"backoff_s": 0.01, "max_retries": 3, "timeout_s": 5, **http}
    return OpenAIBackend(LLMConfig(backend="openai", model="big-teacher", http=HttpConfig(base_url=url, **http)))


def request(schema=SCHEMA):
    return GenerationRequest("extraction", TEMPLATES["extraction"].messages("Ann: I have a cat."), 64, schema)


@pytest.mark.timeout(60)
def test_sends_schema_as_response_format():
    with StubOpenAI() as stub:
        results = backend(stub.url).generate([request(), request(None)])
    constrained, free = stub.requests if "response_format" in stub.requests[0] else stub.requests[::-1]
    assert constrained["response_format"]["type"] == "json_schema"
    assert constrained["response_format"]["json_schema"]["schema"] == SCHEMA
    assert "response_format" not in free
    assert constrained["temperature"] == 0.0 and constrained["model"] == "big-teacher"
    assert [r.text for r in results] == ['{"facts": ["Ann has a cat"]}'] * 2
    assert [r.constrained for r in results] == [True, False]
    assert results[0].prompt_tokens == 11 and results[0].completion_tokens == 7


@pytest.mark.timeout(60)
def test_headers_go_with_every_call():
    """A client names its conversation (`x-memlora-conversation`) so capture and deferral group its calls."""
    with StubOpenAI() as stub:
        llm = OpenAIBackend(LLMConfig(backend="openai", model="big-teacher", http=HttpConfig(base_url=stub.url)),
                            headers={"x-memlora-conversation": "user-7"})
        llm.generate([request(), request(None)])
        llm.close()
    assert [h.get("x-memlora-conversation") for h in stub.headers] == ["user-7", "user-7"]


@pytest.mark.timeout(60)
def test_schema_rejection_is_a_clear_error_or_a_recorded_fallback():
    with StubOpenAI() as stub:
        stub.reject_schema = True
        with pytest.raises(SchemaRejected, match="rejected the extraction request with response_format"):
            backend(stub.url).generate([request()])
        fallback = backend(stub.url, on_schema_rejected="free")
        result = fallback.generate([request()])[0]
    assert result.constrained is False and fallback.free_fallbacks == 1


@pytest.mark.timeout(60)
def test_retries_429_and_5xx_then_succeeds():
    with StubOpenAI() as stub:
        stub.fail_first, stub.fail_status = 2, 429
        assert backend(stub.url).generate([request()])[0].text.startswith('{"facts"')
        assert len(stub.requests) == 3
        stub.fail_first, stub.fail_status = 10, 503
        with pytest.raises(TeacherUnavailable, match="gave up after 4 attempts"):
            backend(stub.url).generate([request()])


@pytest.mark.timeout(60)
def test_timeouts_and_dead_server():
    with StubOpenAI() as stub:
        stub.stall_s = 1.0
        with pytest.raises(TeacherUnavailable, match="ReadTimeout"):
            backend(stub.url, timeout_s=0.2, max_retries=1).generate([request()])
        url = stub.url
    with pytest.raises(TeacherUnavailable, match="ConnectError"):
        backend(url, max_retries=1).generate([request()])


@pytest.mark.timeout(300)
def test_server_dying_mid_run_names_missing_conversations_and_rerun_fills_them(prefect_server, sample_path, tmp_path):
    import yaml

    from memlora.flows.traces import generate_traces
    from memlora.teacher.traces import TracesIncomplete
    from tests.conftest import REPO
    from tests.test_traces_flow import rows

    replies = {
        "extraction": '{"facts": ["Ann has a cat", "Ben bakes bread"]}',
        "update": '{"memory": [{"id": "0", "text": "Ann has a cat", "event": "ADD"}]}',
        "generation": '{"answer": "a cat"}',
    }
    with StubOpenAI() as stub:
        stub.replies = replies
        raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
        raw["teacher"] = {"backend": "openai", "model": "big-teacher",
                          "http": {"base_url": stub.url, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5}}
        raw["data"].update(max_conversations=2, max_sessions=1, max_questions=1,
                           split={"test_ratio": 0.25, "validation_ratio": 0.0, "seed": 0})
        raw["prefect"] = {"concurrency": 1}
        config = tmp_path / "c.yaml"
        config.write_text(yaml.safe_dump(raw))

        reference = tmp_path / "reference"
        generate_traces(config_path=str(config), data=str(sample_path), out=str(reference))
        total = stub.served
        stub.served, stub.fail_after = 0, total // 2 + 1  # dies during the second conversation
        out = tmp_path / "out"
        with pytest.raises(TracesIncomplete, match=r"no traces for 1 conversation\(s\): sample-\w+") as err:
            generate_traces(config_path=str(config), data=str(sample_path), out=str(out))
        assert "rerun" in str(err.value)
        stub.fail_after = None
        generate_traces(config_path=str(config), data=str(sample_path), out=str(out))
    assert rows(out) == rows(reference)


@pytest.mark.timeout(420)
def test_process_and_dask_task_runners_give_the_thread_runners_rows(prefect_server, sample_path, tmp_path):
    """The distributed path: each conversation's task runs in another process (a process pool, then the two
    worker processes of a Dask LocalCluster), gets its parameters pickled and builds its own HTTP teacher
    client, embedder and store."""
    import yaml

    from memlora.flows.traces import generate_traces
    from tests.conftest import REPO
    from tests.test_traces_flow import rows

    with StubOpenAI() as stub:
        stub.replies = {
            "extraction": '{"facts": ["Ann has a cat", "Ben bakes bread"]}',
            "update": '{"memory": [{"id": "0", "text": "Ann has a cat", "event": "ADD"}]}',
            "generation": '{"answer": "a cat"}',
        }
        raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
        raw["teacher"] = {"backend": "openai", "model": "big-teacher",
                          "http": {"base_url": stub.url, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5}}
        raw["data"].update(max_conversations=2, max_sessions=1, max_questions=1,
                           split={"test_ratio": 0.25, "validation_ratio": 0.0, "seed": 0})
        outs = {}
        dask = {"cluster_kwargs": {"n_workers": 2, "threads_per_worker": 1, "processes": True,
                                   "dashboard_address": None}}
        for name, runner, options in (("thread", "thread", {}), ("process", "process", {}),
                                      ("dask", "prefect_dask:DaskTaskRunner", dask)):
            raw["prefect"] = {"concurrency": 2, "task_runner": runner, "task_runner_options": options}
            config = tmp_path / f"{name}.yaml"
            config.write_text(yaml.safe_dump(raw))
            outs[name] = tmp_path / name
            generate_traces(config_path=str(config), data=str(sample_path), out=str(outs[name]))
    assert rows(outs["process"]) == rows(outs["thread"]) == rows(outs["dask"])
    for name in ("process", "dask"):
        assert len(list((outs[name] / "memory").glob("teacher-*.sqlite"))) == 2  # a store per task


def test_distributed_runner_needs_an_http_teacher_and_an_importable_class(tmp_path):
    import yaml

    from memlora.config import ConfigError, PrefectConfig, parse_config
    from memlora.tasks.common import build_task_runner
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["prefect"] = {"task_runner": "prefect_dask:DaskTaskRunner"}
    with pytest.raises(ConfigError, match="prefect.task_runner: .*teacher.backend: openai"):
        parse_config(raw)
    with pytest.raises(ConfigError, match=r"cannot import not_installed_pkg:Runner .*pip install prefect-dask"):
        build_task_runner(PrefectConfig(task_runner="not_installed_pkg:Runner"))
