"""Experts: one peft adapter per memory operation (DeLoRA by default; LoRA and ETHER for comparison), and
inference with all of them on one base model, switched per operation by repointing the adapted layers (or, in
float32, by merging the active expert into the base weights)."""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch
from peft import DeloraConfig, HRAConfig, LoraConfig, PeftModel, get_peft_model

from memlora.config import OPERATIONS, ExpertConfig
from memlora.data.io import sha256_file
from memlora.layout import adapter_dir
from memlora.llm.client_template import AS_SENT, expert_view, read_template
from memlora.llm.calibration import calibration_ids
from memlora.llm.decoding import Decoded, RowSpec, RunningBatch, mergeable
from memlora.llm.grammar import GrammarCache
from memlora.llm.hf_backend import TransformersBackend, load_causal_lm, quantize_model
from memlora.manifest import check_recorded
from memlora.memory.llm import GenerationRequest
from memlora.student.householder import use_input_reflections
from memlora.llm.quantize import BARE, MERGE_LOSES, SMOOTHABLE, fold_beside, quantize_merged, smoothing

log = logging.getLogger(__name__)
# peft reads transformers' deprecated `is_gradient_checkpointing` on every PeftModel it builds: a FutureWarning
# in every command's output that no user of ours can act on
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def adapter_config(expert: ExpertConfig):
    if expert.method == "delora":
        return DeloraConfig(
            r=expert.r, delora_lambda=expert.delora_lambda, target_modules=list(expert.target_modules),
            module_dropout=expert.module_dropout, task_type="CAUSAL_LM",
        )
    if expert.method == "ether":
        # ETHER is one Householder reflection per weight: W (I - 2 u u^T / |u|^2). peft's HRA with r=1 is exactly
        # that (it warns that an odd r cannot start as the identity: a reflection never is).
        return HRAConfig(r=1, apply_GS=False, target_modules=list(expert.target_modules), task_type="CAUSAL_LM")
    return LoraConfig(
        r=expert.r, lora_alpha=expert.lora_alpha, target_modules=list(expert.target_modules),
        lora_dropout=expert.module_dropout, task_type="CAUSAL_LM",
    )


def attach_expert(model, expert: ExpertConfig, name: str = "default"):
    """A fresh trainable expert on `model`; only the adapter's parameters require grad. ETHER layers apply
    their reflection to the input (`student.householder`), not to a rebuilt weight."""
    model = get_peft_model(model, adapter_config(expert), adapter_name=name)
    use_input_reflections(model)
    return model


def resume_expert(model, folder: str | Path, name: str = "default"):
    """A trainable expert that starts from a saved one's weights and config (improve's warm start)."""
    model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=True, use_safetensors=True)
    use_input_reflections(model)
    return model


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what peft reads when loading an expert
# The client template an expert of a captured operation was trained to read (`llm.client_template`): it travels
# with the expert (versions, promotion, the manifest), so a served expert always reduces calls as it learnt them.
TEMPLATE_FILE = "client_template.json"


def expert_files(folder: Path) -> list[Path]:
    """The files that decide an expert's answers: peft's two, and its client template where it has one."""
    return [folder / name for name in ADAPTER_FILES] + [p for p in [folder / TEMPLATE_FILE] if p.is_file()]


def is_complete_adapter(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ADAPTER_FILES)


def expert_digests(adapters: dict[str, Path]) -> dict[str, str]:
    """Per operation, the sha256 of its expert's weights: what deferral thresholds are calibrated for."""
    return {op: sha256_file(Path(folder) / ADAPTER_FILES[1]) for op, folder in adapters.items()}


def expert_folders(out: str | Path) -> dict[str, Path]:
    """The trained experts under OUT/adapters/, by operation."""
    return {op: adapter_dir(out, op) for op in OPERATIONS if is_complete_adapter(adapter_dir(out, op))}


def verified_expert_folders(out: str | Path) -> dict[str, Path]:
    """`expert_folders`, each file checked against OUT/manifest.json first: a changed or unrecorded adapter
    stops the load (UntrustedArtifact) instead of being run."""
    folders = expert_folders(out)
    check_recorded(out, [path for folder in folders.values() for path in expert_files(folder)])
    return folders


def adapter_name(operation: str) -> str:
    """The peft adapter name of an operation's expert. Not the bare operation name: peft keeps adapters in
    `nn.ParameterDict`s, and "update" is a `ParameterDict` method, so an adapter called "update" cannot be
    registered (KeyError: attribute 'update' already exists)."""
    return f"expert_{operation}"


class ExpertBackend(TransformersBackend):
    """One student base with every expert attached, an `LLMBackend` like the teacher's.

    Each batch runs on its operation's expert: `before_batch` (called under the generation lock) repoints the
    adapted layers at that expert (what peft's `set_adapter` does, without walking every module); the base is
    loaded once and never reloaded. An operation without an expert, `bare()`, or
    `adapters=None` run the bare student base (adapter layers disabled, or none attached).

    Un-merged (the default), every expert sits beside the shared base folded into one low-rank pair per adapted
    layer (`llm.quantize.fold_beside`): a switch is one assignment, the base is neither copied nor changed, and a
    step costs two small products more per adapted layer (peft's own DeLoRA layer takes about ten operations).
    `merge=True` with float32 weights: a switch writes the active expert into the base weights, restored first
    from a copy kept at load, so a step costs what the bare base's does; the copy costs one more set of the
    adapted weights (~340 MiB on the embedded default's student) and a switch ~114 ms (restoring keeps it exact;
    merging and un-merging by arithmetic would drift). Measured side by side on the embedded default: peak RSS
    1,453 MiB folded against 1,980 merged, p50 per call 1.07-1.09x, the same answers (docs/results.md). In
    bfloat16 a merged update of ~1 % of a weight loses much of its precision, so there the experts stay beside.
    `merge=True` with `quantize="int8"`: one int8 copy of each adapted layer per expert, merged before quantizing,
    and one of the bare base (`llm.quantize.quantize_merged`); a switch is one assignment; `smoothing_alpha` > 0
    smooths the activations' outlier channels into the weights first (`llm.quantize.smoothing`, calibrated on the
    memory system's own few-shot prompts); `keep_float32` names linears left float32. Un-merged, the experts run
    in float32 beside the quantized base, each folded into one low-rank pair per layer (`llm.quantize.
    fold_beside`; a switch is again one assignment). With `quantize="int4_weight"` the experts always stay
    beside the base: merging moves a weight off the 16-level grid the model shipped on, and re-rounding it loses
    the expert (measured: no answer identical to float32's, `bench/int8_designs.py`)."""

    backend_name = "transformers+experts"

    def __init__(self, base: str | Path, adapters: dict[str, Path] | None, *, batch_size: int = 8,
                 device: str = "auto", dtype: str = "auto", prefix_cache: bool = True, prompt: str = "teacher",
                 merge: bool = False, quantize: str = "none", smoothing_alpha: float = 0.0,
                 keep_float32: tuple[str, ...] = (), grammars: GrammarCache | None = None):
        methods = {op: json.loads((Path(folder) / "adapter_config.json").read_text())["peft_type"]
                   for op, folder in (adapters or {}).items()}
        if len(set(methods.values())) > 1:  # peft keeps one adapter type per model
            raise ValueError("experts of different methods cannot share one base (peft loads one adapter type per "
                             f"model): {', '.join(f'{op} {m}' for op, m in sorted(methods.items()))}")
        model, tokenizer, model_id = load_causal_lm(str(base), dtype=dtype, device=device)
        self.prompt = prompt  # "minimal": an operation with an expert reads the student template
        self.templates = {op: read_template(Path(folder) / TEMPLATE_FILE) for op, folder in (adapters or {}).items()
                          if (Path(folder) / TEMPLATE_FILE).is_file()}
        self.operations: list[str] = [op for op in OPERATIONS if op in (adapters or {})]
        self.operations += [op for op in (adapters or {}) if op not in self.operations]
        self.digests = expert_digests({op: adapters[op] for op in self.operations})
        if self.operations:
            first, *rest = self.operations
            # safetensors only: adapter weights are never unpickled
            model = PeftModel.from_pretrained(model, str(adapters[first]), adapter_name=adapter_name(first),
                                              use_safetensors=True)
            for op in rest:
                model.load_adapter(str(adapters[op]), adapter_name=adapter_name(op), use_safetensors=True)
            model.eval()
            use_input_reflections(model)
        # After the adapters are attached (DeLoRA reads each base weight's norms from the float32 weights) and
        # before the backend sets up its CPU linears (a quantized layer keeps its own kernel). Merged, each adapted
        # layer becomes one int8 copy per expert and one of the base, and a switch sets `_switch["active"]`.
        # Smoothing needs every linear's weights to take its scales: merged variants, or no adapter at all (an
        # adapter beside its layer would read the scaled input).
        self._switch = None
        self.folded = False  # experts beside the base as low-rank pairs (`fold_beside`)
        if quantize == "none" and merge and self.operations and model.dtype != torch.float32:
            log.info("experts stay beside the base: merging is exact in float32 only (weights are %s)", model.dtype)
            merge = False
        if quantize in MERGE_LOSES and merge and self.operations:
            log.info("experts stay beside the %s base: merged, each weight would be rounded off its grid", quantize)
            merge = False
        self.keep_float32 = tuple(keep_float32) if quantize != "none" else ()
        smoothable = quantize in SMOOTHABLE and (merge or not self.operations)
        self.smoothing_alpha = smoothing_alpha if smoothable else 0.0
        if smoothing_alpha and not smoothable:
            why = ("the base is not quantized" if quantize == "none"
                   else f"the base is {quantize} (activations are not rounded to int8)" if quantize not in SMOOTHABLE
                   else "experts beside the base would read the scaled input")
            log.info("int8 smoothing not applied: %s", why)
        if quantize != "none" and merge and self.operations:
            smooth = (smoothing(model, calibration_ids(tokenizer), smoothing_alpha, self.keep_float32)
                      if self.smoothing_alpha else None)
            self._switch = quantize_merged(model, [adapter_name(op) for op in self.operations], quantize, smooth,
                                           self.keep_float32)
            self.quantized = quantize
        else:
            self.quantized = quantize_model(model, tokenizer, quantize, self.smoothing_alpha, self.keep_float32)
            if self.operations and (self.quantized or not merge):  # beside the base: each expert one low-rank pair
                self._switch = fold_beside(model, [adapter_name(op) for op in self.operations])
                self.folded = self._switch is not None
        super().__init__(model, tokenizer, model_id, batch_size=batch_size, prefix_cache=prefix_cache,
                         grammars=grammars)
        # The adapted layers, found once: a switch then only repoints them (peft's `set_adapter` walks every
        # module of the model and toggles requires_grad each time: 4 ms per switch here, measured).
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        modules = list(model.modules()) if self.operations else []
        self._tuner_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
        self._fast_switch = not any(isinstance(m, AuxiliaryTrainingWrapper) for m in modules)
        weights = [] if self.quantized else [layer.get_base_layer().weight for layer in self._tuner_layers]
        self.merge = bool(merge and weights and all(w.dtype == torch.float32 for w in weights))
        self._originals = [w.detach().clone() for w in weights] if self.merge else []
        self.active: str | None = self.operations[0] if self.operations else None
        self.switches = 0
        self._bare = False
        if self._switch is not None:
            self.merge = not self.folded
            self._switch["active"] = adapter_name(self.active)
            for layer in self._tuner_layers:
                layer._active_adapter = [adapter_name(self.active)]
        elif self.active is not None:
            self._merge_into_base(adapter_name(self.active))

    @classmethod
    def from_config(cls, config, base: str | Path, adapters: dict[str, Path] | None,
                    prompt: str = "teacher", grammars: GrammarCache | None = None) -> "ExpertBackend":
        """The run config's batch size, device, dtype, prefix cache and merging (what evaluation and serve-experts
        use); `grammars`: another backend's compiled grammars, kept where the tokenizer is the same."""
        student = config.student
        return cls(base, adapters, batch_size=config.teacher.batch_size, device=config.teacher.device,
                   dtype=student.dtype if student else "auto", prefix_cache=config.teacher.prefix_cache,
                   prompt=prompt, merge=student.merges_experts if student else False,
                   quantize=student.quantize if student else "none",
                   smoothing_alpha=student.int8_smoothing if student else 0.0,
                   keep_float32=tuple(student.int8_keep_float32) if student else (), grammars=grammars)

    @classmethod
    def from_out(cls, base: str | Path, out: str | Path, **kwargs) -> "ExpertBackend":
        return cls(base, verified_expert_folders(out) or None, **kwargs)

    def use(self, operation: str | None) -> None:
        """Activate `operation`'s expert (None: the bare base). A switch repoints the adapted layers (no weights
        move) and, merged, rewrites their base weights from the kept copy plus the expert's update."""
        if operation is not None and operation not in self.operations:
            raise KeyError(f"no expert for {operation!r} (have: {', '.join(self.operations) or 'none'})")
        if not self.operations:
            return
        if self._switch is not None:  # quantized copies or folded pairs per expert: one assignment every layer reads
            name = adapter_name(operation) if operation is not None else BARE
            self._switch["rows"] = None  # every row on this expert (no running batch's rows routed apart)
            if self._switch["active"] != name:
                self._switch["active"] = name
                for layer in self._tuner_layers:  # layers kept float32 run their expert beside the shared base
                    layer._disable_adapters = operation is None
                    if operation is not None:
                        layer._active_adapter = [name]
                self.switches += 1
            self.active = operation
            return
        if operation is None:
            if self.active is not None:
                self._merge_into_base(None)
                self.model.base_model.disable_adapter_layers()
                self.active = None
            return
        if self.active is None:
            self.model.base_model.enable_adapter_layers()
        name = adapter_name(operation)
        if self.model.active_adapter != name:
            if self._fast_switch:  # what set_adapter does for adapters already loaded frozen, without the walk
                for layer in self._tuner_layers:
                    layer._active_adapter = [name]
                self.model.base_model.active_adapter = name
                self.model.active_adapter = name
            else:
                self.model.set_adapter(name, inference_mode=True)
            self.switches += 1
        if self.active != operation:
            self._merge_into_base(name)
        self.active = operation

    def _merge_into_base(self, name: str | None) -> None:
        """Merged mode: the base weights as loaded, plus expert `name`'s update (None: the base alone)."""
        if not self.merge:
            return
        with torch.no_grad():
            for layer, original in zip(self._tuner_layers, self._originals):
                layer.get_base_layer().weight.data.copy_(original)
                layer.merged_adapters = []
                if name is not None:
                    layer.merge(adapter_names=[name])

    @contextmanager
    def bare(self) -> Iterator["ExpertBackend"]:
        """Run on the student base alone (every adapter disabled) inside the block."""
        with self._lock:
            previous, self._bare = self._bare, True
            self.use(None)
        try:
            yield self
        finally:
            with self._lock:
                self._bare = previous

    def expert_view(self, operation: str, messages: list[dict]) -> tuple[list[dict], str]:
        """What the expert of `operation` reads of a call (`llm.client_template.expert_view`): with `student.prompt:
        minimal`, our own prompt cut to its input, a client's cut to what changes; the bare base reads it whole."""
        if self._bare or operation not in self.operations:
            return messages, AS_SENT
        return expert_view(self.prompt, operation, messages, self.templates.get(operation))

    def _viewed(self, requests: list[GenerationRequest]) -> list[GenerationRequest]:
        return [replace(r, messages=self.expert_view(r.operation, r.messages)[0]) for r in requests]

    def generate(self, requests):
        return super().generate(self._viewed(requests))

    def before_batch(self, operation: str) -> None:
        self.use(operation if operation in self.operations and not self._bare else None)

    def mixes_operations(self) -> bool:
        """Folded beside the base, the experts' rows share one running batch (`memlora.llm.continuous`): the base's
        product is shared and each row's pair runs on its own rows (`_route`), as LoRAX and S-LoRA batch many
        adapters (a student without experts is one model, as the teacher). Merged copies or peft's own layers
        switch per batch instead."""
        return (self.folded or not self.operations) and mergeable(self.model)

    def running_batch(self) -> RunningBatch:
        return RunningBatch(self.model, self.stop_ids, trim=True, route=self._route if self.folded else None)

    def join(self, batch: RunningBatch, requests: list[GenerationRequest]) -> tuple[list[Decoded], list[int]]:
        return super().join(batch, self._viewed(requests))

    def row_spec(self, request: GenerationRequest) -> RowSpec:
        """Called once the batch's expert is switched on: the row remembers it for the running batch's steps."""
        spec = super().row_spec(request)
        return replace(spec, adapter=self._switch["active"]) if self.folded else spec

    def _route(self, specs: list[RowSpec]) -> None:
        """Point the next forward's rows at their experts: one expert for all is a plain switch, else each row
        names its own (`BesideLinear._per_row`)."""
        names = [spec.adapter for spec in specs]
        if len(set(names)) == 1:
            self._switch["rows"], self._switch["active"] = None, names[0]
        else:
            self._switch["rows"], self._switch["masks"] = names, {}  # the layers' masks, made once per step

    def cache_tag(self) -> str:
        return f"expert:{self.active or 'bare'}"  # a cached prefix is only valid under the same adapter
