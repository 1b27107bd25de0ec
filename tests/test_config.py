import pytest

from memlora.config import ConfigError, load_config, parse_config
from tests.conftest import REPO, TEACHER_REF


def raw(**overrides):
    base = {"teacher": {"model": TEACHER_REF}, "student": {"prune": {"from": "teacher", "every": 3}}}
    for key, value in overrides.items():
        base[key] = value
    return base


def test_default_config_loads():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg.memory.operations["update"].constrained
    assert cfg.student.prune.drop == 4 and cfg.distill.zero_stage == 2 and cfg.student.prompt == "minimal"
    assert cfg.data.split.validation_ratio > 0 and cfg.student.expert.delora_lambda == 1.0


@pytest.mark.parametrize(
    "overrides,key,message",
    [
        ({"teachr": {"model": "x"}}, "teachr", "unknown key"),
        ({"memory": {"windw": 2}}, "memory.windw", "unknown key (did you mean 'window'?); this section takes: "),
        ({"distill": {"lerning_rate": 1e-3}}, "distill.lerning_rate", "(did you mean 'learning_rate'?)"),
        ({"training": {"epochs": 2}}, "training", "unknown key; this section takes: capture, data, deferral"),
        ({"memory": {"window": "two"}}, "memory.window", "integer"),
        ({"memory": {"operations": {"update": {"constrained": "sometimes"}}}}, "memory.operations.update.constrained", "boolean"),
        ({"teacher": {"model": "/no/such/model-folder"}}, "teacher.model", "not found"),
        ({"teacher": {"model": "pkg:no_such_package_xyz/model.gguf"}}, "teacher.model", "not installed"),
        ({"student": {"model": "./missing-student"}}, "student.model", "not found"),
        ({"student": {"prune": {"from": "teacher", "every": 3}, "expert": {"r": 0}}}, "student.expert.r", "greater than 0"),
        ({"student": {"prune": {"from": "teacher", "every": 3}, "expert": {"r": -4}}}, "student.expert.r", "greater than 0"),
        ({"student": {"prune": {"from": "teacher"}}}, "student.prune", "exactly one of keep_layers, every or drop"),
        ({"distill": {"zero_stage": 1}}, "distill.zero_stage", "2 or 3"),
        ({"distill": {"learning_rate": -1}}, "distill.learning_rate", "greater than 0"),
        ({"data": {"split": {"test_ratio": 1.5}}}, "data.split.test_ratio", "less than 1"),
    ],
)
def test_bad_config_names_the_key(overrides, key, message):
    with pytest.raises(ConfigError) as err:
        parse_config(raw(**overrides), "bad.yaml")
    text = str(err.value)
    assert "bad.yaml" in text and key in text and message in text, text


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "c.yaml").write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_trust_remote_code_is_off_by_default():
    cfg = parse_config(raw())
    assert cfg.teacher.trust_remote_code is False and cfg.student.trust_remote_code is False


def test_the_extraction_schema_fits_its_token_budget(smol_tokenizer_dir):
    """max_facts facts of the longest allowed length must fit max_new_tokens, or a looping teacher is cut."""
    import json

    from transformers import AutoTokenizer

    from memlora.config import MemoryConfig, OperationConfig

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    words = "Felix opened a bread stall at the Sunday farmers market on Pine Road with Juno and Nadia in May 2023 "
    for budget, facts, chars in ((128, 4, 160), (64, 2, 200), (256, 6, 120)):
        memory = MemoryConfig(max_facts=facts, max_fact_chars=chars,
                              operations={"extraction": OperationConfig(max_new_tokens=budget)})
        n = memory.fact_chars()
        assert n <= chars
        worst = json.dumps({"facts": [(words * 10)[:n]] * facts})
        assert len(tok(worst, add_special_tokens=False)["input_ids"]) <= budget, (budget, facts, n)


def test_a_packaged_model_is_recorded_by_its_reference_not_this_machines_path():
    from memlora.models import resolve
    from tests.conftest import TEACHER_REF

    ref = resolve(TEACHER_REF)
    assert ref.model_id == TEACHER_REF and ref.path.startswith("/")  # loaded from the venv, recorded portably


def test_a_config_extends_another_and_names_only_what_it_changes(tmp_path):
    (tmp_path / "base.yaml").write_text(f"name: base\nteacher: {{model: {TEACHER_REF}}}\n"
                                        "memory: {window: 3, top_k: 5}\n")
    (tmp_path / "variant.yaml").write_text("extends: base.yaml\nname: variant\nmemory: {top_k: 2}\n")
    cfg = load_config(tmp_path / "variant.yaml")
    assert (cfg.name, cfg.memory.window, cfg.memory.top_k) == ("variant", 3, 2)
    (tmp_path / "orphan.yaml").write_text("extends: gone.yaml\n")
    with pytest.raises(ConfigError, match="orphan.yaml: extends: 'gone.yaml' is neither a file beside it"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "loop.yaml")


@pytest.mark.parametrize("quantize, asked, merged", [
    ("none", None, False), ("int4_weight", None, False), ("int8", None, True), ("int8_weight", None, True),
    ("none", True, True), ("int8_weight", False, False),
])
def test_experts_merge_where_their_scheme_gains_from_it_unless_the_config_says(quantize, asked, merged):
    """Unset, float32 experts stay beside the base (no float32 copy of it) and int8 ones merge (their fast design);
    an explicit `merge_experts` wins."""
    student = {"prune": {"from": "teacher", "drop": 4}, "quantize": quantize}
    if asked is not None:
        student["merge_experts"] = asked
    assert parse_config(raw(student=student)).student.merges_experts is merged
