"""Distillation through the real `deepspeed` launcher on DeepSpeed's CPU accelerator, tiny models: two ranks
under ZeRO-2 and ZeRO-3 lower the loss and write adapters that reload with the same outputs; two experts in one
launch equal those of a launch each; a failed rank or a timeout raises with the log; a finished expert is not
trained again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memlora.cpu import has_bf16_units
from memlora.data.io import sha256_file
from memlora.layout import trace_files
from memlora.student.build import build_student
from memlora.student.distill import distill_operation, distill_operations, finished_record
from memlora.student.records import NoExpert
from memlora.student.examples import build_examples, load_traces
from memlora.student.launch import TrainingFailed
from memlora.student.trainer import Collator, mean_loss
from tests.student_fixtures import distill_config, write_traces

PRUNE = {"prune": {"from": "teacher", "keep_layers": [0, 2]}}  # shares the tiny teacher's tokenizer: KD applies


def setup(tmp_path: Path, tiny_model_dir: Path, operations=("extraction",), **distill):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    write_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir), operations=operations)
    # The launch's own watchdog fires before pytest-timeout (240 s), so a hung launch fails with its ranks' last lines.
    settings = dict(max_steps=8, batch_size=2, learning_rate=0.01, num_ranks=2, timeout_s=180) | distill
    path, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir), student=PRUNE, **settings)
    return out, path, config, build_student(config, out)


def trained_in_bf16(out: Path, operation: str) -> bool:
    """The losses are re-taken in the precision the training took them in (distill.cpu_precision)."""
    return json.loads((out / "adapters" / operation / "training.json").read_text())["compute_dtype"] == "bfloat16"


def reloaded_loss(config, out: Path, base: Path, operation: str) -> tuple[float, object]:
    """The training record's loss, recomputed from the adapter as saved: same probe rows, same loss."""
    from peft import PeftModel

    from memlora.llm.hf_backend import load_causal_lm

    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
    model = PeftModel.from_pretrained(model, str(out / "adapters" / operation), use_safetensors=True)
    cfg = config.distill
    data = build_examples(load_traces(trace_files(out, operation)), tokenizer, cfg.max_length, True)
    top_k = max(len(s) for e in data.examples if e.teacher_ids for s in e.teacher_ids)
    return mean_loss(model, data.examples[: 4 * cfg.batch_size], Collator(tokenizer.pad_token_id, top_k), cfg,
                     "cpu", trained_in_bf16(out, operation)), model


def check_adapter(folder: Path) -> dict:
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "DELORA"
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert tensors and all(t.numel() > 0 for t in tensors.values())  # ZeRO-3's empty-tensor trap
    assert any("delora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())  # it trained
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "training.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging/work folder left
    return json.loads((folder / "training.json").read_text())


@pytest.mark.timeout(240)
def test_two_cpu_ranks_zero2_lower_the_loss_and_write_a_loadable_adapter(tiny_model_dir, tmp_path, monkeypatch):
    out, path, config, base = setup(tmp_path, tiny_model_dir, cpu_precision="auto")
    lines: list[str] = []
    record = distill_operation(config, out, "extraction", base, on_line=lines.append)

    saved = check_adapter(out / "adapters" / "extraction")
    assert record.to_dict(on_disk=True) == saved
    assert (record.world_size, record.deepspeed_stage, record.device, record.steps) == (2, 2, "cpu", 8)
    assert record.compute_dtype == ("bfloat16" if has_bf16_units() else "float32")  # cpu_precision: auto
    assert record.global_batch_size == 4 and len(record.loss_curve) == 8
    assert record.loss_after < record.loss_before
    assert (record.rows_total, record.rows_used, record.rows_skipped) == (6, 5, {"parse_failed": 1})
    assert record.rows_with_teacher_logprobs == 5 and record.tokens_seen > 0
    assert 0 < record.trainable_parameters < record.total_parameters
    # The launcher's log came through line by line: both ranks spawned and exited cleanly.
    assert sum("spawned with command" in line for line in lines) == 2
    assert sum("exits successfully" in line for line in lines) == 2
    assert any("'loss'" in line for line in lines)

    loss, _ = reloaded_loss(config, out, base, "extraction")
    assert loss == pytest.approx(record.loss_after, rel=1e-4, abs=1e-4)

    # Same traces and recipe: kept, no launch. Another recipe: trained again.
    import memlora.student.distill as distill

    monkeypatch.setattr(distill, "run_trainings", lambda *a, **k: pytest.fail("trained a finished expert again"))
    again = distill_operation(config, out, "extraction", base, on_line=lines.append)
    assert again.skipped and again.cache_key == record.cache_key
    _, changed = distill_config(tmp_path / "c2.yaml", str(tiny_model_dir), student=PRUNE, max_steps=9,
                                batch_size=2, learning_rate=0.01, num_ranks=2)
    assert finished_record(changed, out, "extraction") is None
    _, longer = distill_config(tmp_path / "c3.yaml", str(tiny_model_dir), student=PRUNE, max_steps=8,
                               batch_size=2, learning_rate=0.01, num_ranks=2, timeout_s=999, cpu_precision="auto")
    assert finished_record(longer, out, "extraction") is not None  # the timeout does not change the expert

    # Another corpus ingested into OUT moved the conversation it trained on to the test split: not kept
    import pyarrow as pa
    import pyarrow.parquet as pq

    from memlora.layout import conversations_file
    from memlora.student.distill import same_split

    assert (record.train_conversations, record.validation_conversations) == (["c1"], [])
    assert record.learnt_from(["c1", "c2"]) == ["c1"]
    conversations_file(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"conversation_id": ["c1"], "split": ["test"]}), conversations_file(out))
    assert finished_record(config, out, "extraction") is None
    assert not same_split(record, out, "extraction", exact=False)
    pq.write_table(pa.table({"conversation_id": ["c1", "c2"], "split": ["train", "test"]}), conversations_file(out))
    assert finished_record(config, out, "extraction") is not None  # the same side as before: the same expert


@pytest.mark.timeout(240)
def test_zero3_adapter_reloads_with_the_same_outputs(tiny_model_dir, tmp_path):
    out, path, config, base = setup(tmp_path, tiny_model_dir, operations=("update", "extraction"), zero_stage=3,
                                    max_steps=4)
    lines: list[str] = []
    records = distill_operations(config, out, ["update", "extraction"], base, on_line=lines.append)
    assert sum("spawned with command" in line for line in lines) == 2  # one launch of two ranks for both experts
    record = records["update"]
    saved = check_adapter(out / "adapters" / "update")
    # The second expert of a launch is the expert a launch of its own trains (no state left by the first):
    alone = tmp_path / "alone"
    shutil.copytree(out / "traces", alone / "traces")
    by_itself = distill_operation(config, alone, "extraction", base, on_line=lambda line: None)
    assert by_itself.loss_curve == records["extraction"].loss_curve
    together, single = (load_file(str(o / "adapters" / "extraction" / "adapter_model.safetensors"))
                        for o in (out, alone))
    assert together.keys() == single.keys() and all(torch.equal(together[k], single[k]) for k in together)
    assert (saved["world_size"], saved["deepspeed_stage"]) == (2, 3)
    loss, model = reloaded_loss(config, out, base, "update")
    # The loss the engine computed with its (sharded) weights, and the loss of the adapter as saved, agree.
    assert loss == pytest.approx(record.loss_after, rel=1e-4, abs=1e-4)
    assert record.loss_after < record.loss_before

    # improve's warm start: a candidate that starts from this expert starts at its loss, not at a fresh one's
    again = tmp_path / "candidate"
    shutil.copytree(out / "traces", again / "traces")
    warm = distill_operation(config, again, "update", base, on_line=lambda line: None,
                             init=out / "adapters" / "update")
    assert warm.loss_before == pytest.approx(record.loss_after, rel=1e-4, abs=1e-4)
    assert warm.init_sha256 == sha256_file(out / "adapters" / "update" / "adapter_model.safetensors")
    assert warm.cache_key != record.cache_key and warm.traces_sha256 == record.traces_sha256


@pytest.mark.timeout(180)
def test_a_failed_rank_raises_with_its_error_and_a_timeout_kills_the_launch(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    out, path, config, base = setup(tmp_path, tiny_model_dir, num_ranks=1)
    write_traces(out, AutoTokenizer.from_pretrained(tiny_model_dir), operations=("generation",), n=3, bad=3)
    # Only unparsable rows: no expert, said so, nothing written.
    record = distill_operation(config, out, "generation", base, on_line=lambda line: None)
    assert isinstance(record, NoExpert) and "no parse_ok" in record.reason
    assert not (out / "adapters" / "generation").exists()

    # Rows too long for distill.max_length: the rank itself fails, and its error comes back.
    path, short = distill_config(tmp_path / "s.yaml", str(tiny_model_dir), student=PRUNE, num_ranks=1, max_length=8)
    with pytest.raises(TrainingFailed) as failed:
        distill_operation(short, out, "extraction", base, on_line=lambda line: None)
    message = str(failed.value)
    assert "exit code" in message and "no usable trace rows" in message and "too_long" in message
    assert not (out / "adapters" / "extraction").exists()

    path, quick = distill_config(tmp_path / "t.yaml", str(tiny_model_dir), student=PRUNE, num_ranks=1, timeout_s=2)
    with pytest.raises(TrainingFailed, match="timeout_s=2"):
        distill_operation(quick, out, "extraction", base, on_line=lambda line: None)
    assert not (out / "adapters" / "extraction").exists()


@pytest.mark.timeout(30)
def test_launcher_command_on_a_cpu_machine(tiny_model_dir, tmp_path, monkeypatch):
    from memlora.student.launch import ExpertJob, launcher_command

    monkeypatch.setattr("memlora.student.launch.gpu_count", lambda: 0)
    _, config = distill_config(tmp_path / "c.yaml", str(tiny_model_dir), student=PRUNE, num_ranks=3)
    cache = {"key": "k", "traces_sha256": "t", "config_fingerprint": "f"}
    jobs = [ExpertJob("update", cache), ExpertJob("generation", cache, "served")]
    cmd, env = launcher_command(config, str(tmp_path / "out"), "base", jobs)
    assert Path(cmd[0]).name == "deepspeed" and cmd[cmd.index("--num_gpus") + 1] == "3"
    assert env["DS_ACCELERATOR"] == "cpu" and int(cmd[cmd.index("--master_port") + 1]) > 0
    assert cmd[cmd.index("--module") + 1] == "memlora.student.train_entry"
    # The ranks read one job file: the config as this process parsed it, the base, each expert's cache key and start.
    from memlora.jobs import read_job

    job_config, job = read_job(cmd[cmd.index("--job") + 1])
    assert job_config.fingerprint() == config.fingerprint()
    assert (job["task"], job["base"]) == ("experts", str(Path("base").resolve()))
    assert job["experts"] == [{"operation": "update", "cache": cache, "init": None},
                              {"operation": "generation", "cache": cache, "init": str(Path("served").resolve())}]
    monkeypatch.setattr("memlora.student.launch.gpu_count", lambda: 4)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cmd, env = launcher_command(config, str(tmp_path / "out"), "base", jobs)
    assert cmd[cmd.index("--num_gpus") + 1] == "4" and "DS_ACCELERATOR" not in env  # all visible GPUs
    _, two = distill_config(tmp_path / "d.yaml", str(tiny_model_dir), student=PRUNE, num_gpus=2)
    cmd, _ = launcher_command(two, str(tmp_path / "out"), "base", jobs)
    assert cmd[cmd.index("--num_gpus") + 1] == "2"


def reloaded_validation_loss(config, out: Path, base: Path, operation: str) -> float:
    """The validation loss of the adapter as saved, on the validation conversations' rows."""
    from peft import PeftModel

    from memlora.llm.hf_backend import load_causal_lm
    from memlora.student.examples import conversation_splits, split_rows
    from memlora.student.templates import template_for

    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
    model = PeftModel.from_pretrained(model, str(out / "adapters" / operation), use_safetensors=True)
    _, val_rows = split_rows(load_traces(trace_files(out, operation)), conversation_splits(out))
    data = build_examples(val_rows, tokenizer, config.distill.max_length, True, prompt=config.student.prompt,
                          template=template_for(config, out, operation))  # as training read them
    return mean_loss(model, data.examples, Collator(tokenizer.pad_token_id, 4), config.distill, "cpu",
                     trained_in_bf16(out, operation))
