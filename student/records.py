"""What distillation says about each operation: the expert's training record (its training.json), or why
there is no expert. Typed here so the trainer, the flow, the CLI and the report read the same names."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

TRAINING_FILE = "training.json"  # beside each expert's adapter files


@dataclass
class TrainingRecord:
    operation: str
    method: str = "delora"                 # student.expert.method (delora | lora | ether)
    steps: int = 0
    loss_before: float | None = None       # distillation loss on a fixed train probe, before and after
    loss_after: float | None = None
    loss_curve: list[float] = field(default_factory=list)   # per logged step
    grad_norms: list[float] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)  # {epoch, step, train_loss, validation_loss, weight_deviation}
    # ||W_adapted - W||_F of the saved adapter (student.deviation): total, total_relative, max_relative, layers
    weight_deviation: dict = field(default_factory=dict)
    best_epoch: int | None = None          # the epoch whose adapter was kept (lowest validation loss)
    best_restored: bool = False            # a later epoch was worse, so the best one was put back
    stopped_early: bool = False            # `distill.patience` epochs without a better validation loss
    validation_loss_before: float | None = None
    validation_loss_best: float | None = None
    validation_rows: int = 0
    warmup_steps: int = 0
    learning_rate: float = 0.0
    prompt: str = "teacher"                # the student template trained on (minimal | teacher)
    prompt_tokens_mean: float = 0.0
    client_template: str = ""              # fingerprint of the client template its captured calls were cut by
    targets: dict = field(default_factory=dict)      # what target selection kept and dropped
    oversampled: dict = field(default_factory=dict)  # update label -> repeat factor (train split only)
    train_examples: int = 0
    tokens_seen: int = 0
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    step_time_s: float = 0.0
    world_size: int = 1
    global_batch_size: int = 0
    deepspeed_stage: int = 0
    device: str = "cpu"
    # what the training steps multiplied in: float32, or bfloat16 autocast (CPU with bfloat16 units, or a GPU)
    compute_dtype: str = "float32"
    rows_total: int = 0
    rows_used: int = 0
    rows_skipped: dict = field(default_factory=dict)
    rows_with_teacher_logprobs: int = 0
    shares_teacher_tokenizer: bool = True
    trainable_parameters: int = 0
    total_parameters: int = 0
    trace_files: list[str] = field(default_factory=list)
    # the conversations whose trace rows were on the train / validation side when it trained (empty in records
    # written before 2026-12-07): a split changed since (another corpus ingested into OUT) retrains it, and
    # evaluation refuses to test it on a conversation it learnt from
    train_conversations: list[str] = field(default_factory=list)
    validation_conversations: list[str] = field(default_factory=list)
    cache_key: str = ""                    # traces + recipe: the same key means the same expert
    traces_sha256: str = ""
    config_fingerprint: str = ""
    init_sha256: str = ""                  # warm start: the sha256 of the adapter weights training started from
    # improve.train_on new: trace shards the starting expert had learnt, left out of this training's rows
    shards_left_out: int = 0
    base: str = ""
    skipped: bool = False                  # not trained now: an earlier run's expert with the same cache key

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingRecord":
        """From a training.json or a rank's result line; keys an older version wrote and this one does not
        know are ignored, ones it did not write take their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def learnt_from(self, conversations) -> list[str]:
        """Which of `conversations` this expert trained or chose its epoch on."""
        return sorted(set(conversations) & (set(self.train_conversations) | set(self.validation_conversations)))

    @classmethod
    def read(cls, path: str | Path) -> "TrainingRecord":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self, *, on_disk: bool = False) -> dict:
        """`on_disk`: what training.json holds (whether this run trained it is not the expert's property)."""
        data = asdict(self)
        if on_disk:
            data.pop("skipped")
        return data

    def summary(self) -> dict:
        """For the manifest: all but the per-step loss curve and the per-layer deviations (training.json has them)."""
        def totals(deviation: dict) -> dict:
            return {k: v for k, v in deviation.items() if k != "layers"}

        data = self.to_dict()
        data.pop("loss_curve")
        data["weight_deviation"] = totals(data["weight_deviation"])
        data["epochs"] = [{**e, "weight_deviation": totals(e["weight_deviation"])} if "weight_deviation" in e else e
                          for e in data["epochs"]]
        return data


@dataclass
class NoExpert:
    """No expert for this operation: the memory system runs it on the bare student."""

    operation: str
    reason: str

    def to_dict(self) -> dict:
        return {"operation": self.operation, "no_expert": True, "reason": self.reason, "steps": 0}

    summary = to_dict


DistillResult = TrainingRecord | NoExpert


def learnt_by(experts: dict[str, Path], conversations) -> tuple[str, Path, list[str]] | None:
    """The first expert (by operation) that trained or chose its epoch on any of `conversations`: (operation, its
    folder, those conversations); None where none did. An expert without a record cannot tell, and passes."""
    conversations = list(conversations)
    for operation, folder in sorted(experts.items()):
        record = folder / TRAINING_FILE
        learnt = TrainingRecord.read(record).learnt_from(conversations) if record.is_file() else []
        if learnt:
            return operation, folder, learnt
    return None
