"""Batched generation and schema-constrained decoding on a tiny random model (fast, every rule checked)."""

import json

import jsonschema
import pytest

from memlora.memory.llm import GenerationRequest
from memlora.memory.parsing import parse_update
from memlora.memory.prompts import COMPACT_UPDATE, TEMPLATES, extraction_schema, generation_schema, update_schema
from memlora.memory.system import render_update

PROMPTS = [
    "Conversation on 8 May 2023:\nAnn: I adopted a cat named Tom.\nBen: Nice, I bake bread.",
    "Conversation on 9 May 2023:\nAnn: Hi!",
    "Conversation on 1 June 2023:\nBen: I moved to Denver last week and started a new job as a nurse.",
    "Conversation on 2 June 2023:\nAnn: My sister Eve lives in Paris and paints.",
    "Conversation on 3 June 2023:\nBen: ok",
]


def free(text, n=24):
    return GenerationRequest("extraction", TEMPLATES["extraction"].messages(text), n)


def extraction(text, schema, n=96):
    return GenerationRequest("extraction", TEMPLATES["extraction"].messages(text), n, schema)


@pytest.mark.timeout(300)
def test_batched_and_sequential_greedy_outputs_are_identical(tiny_backend):
    requests = [free(p) for p in PROMPTS]
    batched = tiny_backend.generate(requests)
    sequential = [tiny_backend.generate([r])[0] for r in requests]
    assert [r.token_ids for r in batched] == [r.token_ids for r in sequential]
    assert [r.text for r in batched] == [r.text for r in sequential]
    assert all(r.batch_size == len(PROMPTS) for r in batched)
    assert all(s.batch_size == 1 for s in sequential)
    # top-k log-probs: one list per generated token, k entries, sorted
    for r in batched:
        assert len(r.top_logprobs) == r.completion_tokens
        assert all(len(step) == 4 and step[0][1] >= step[-1][1] for step in r.top_logprobs)


@pytest.mark.timeout(300)
def test_every_constrained_extraction_output_validates(tiny_backend):
    schema = extraction_schema(max_facts=2, max_chars=12)
    results = tiny_backend.generate([extraction(p, schema) for p in PROMPTS])
    for r in results:  # all rows, not a rate
        assert r.constrained and r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)


@pytest.mark.timeout(300)
def test_update_id_enum_holds_per_prompt_in_a_mixed_batch(tiny_backend):
    requests, schemas = [], []
    for n_shown in (0, 1, 3, 2, 0, 3):
        ids = [str(i) for i in range(n_shown)]
        schema = update_schema(ids, str(n_shown), max_chars=10)
        shown = [type("M", (), {"text": f"memory {i}"})() for i in range(n_shown)]
        requests.append(GenerationRequest("update", TEMPLATES["update"].messages(
            render_update(shown, "Ann has a cat", str(n_shown))), 240, schema))  # room for 4 full entries
        schemas.append(schema)
    results = tiny_backend.generate(requests)
    assert {r.batch_size for r in results} == {len(requests)}  # one batch: no per-row fallback
    for request, r, n_shown in zip(requests, results, (0, 1, 3, 2, 0, 3)):
        value = json.loads(r.text)
        jsonschema.validate(value, request.schema)
        for item in value["memory"]:
            allowed = {str(n_shown)} if item["event"] == "ADD" else {str(i) for i in range(n_shown)}
            assert item["id"] in allowed


@pytest.mark.timeout(300)
def test_batched_constrained_equals_one_at_a_time(tiny_backend):
    schema = generation_schema(max_chars=16)
    requests = [GenerationRequest("generation", TEMPLATES["generation"].messages(f"Memories:\n- (none)\nQuestion: {p}"),
                                  40, schema) for p in PROMPTS]
    batched = tiny_backend.generate(requests)
    one_by_one = [tiny_backend.generate([r])[0] for r in requests]
    assert [r.text for r in batched] == [r.text for r in one_by_one]
    for r in batched:
        jsonschema.validate(json.loads(r.text), schema)


def test_grammars_are_compiled_once_per_schema(tiny_backend):
    before = tiny_backend.grammars.compiled
    schema = extraction_schema(max_facts=3, max_chars=7)
    tiny_backend.grammars.grammar(schema)
    tiny_backend.grammars.grammar(json.loads(json.dumps(schema)))
    assert tiny_backend.grammars.compiled == before + 1


@pytest.mark.timeout(120)
def test_a_new_backend_keeps_anothers_grammars_only_for_the_same_vocabulary(tiny_backend, tiny_model_dir):
    """A reloaded or second backend of the same student reuses the compiled grammars (an update schema takes ~1.8 s
    to compile on 2 cores); a tokenizer with another vocabulary gets its own."""
    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm

    schema = extraction_schema(max_facts=2, max_chars=9)
    tiny_backend.grammars.grammar(schema)
    model, tok, model_id = load_causal_lm(str(tiny_model_dir), device="cpu")
    again = TransformersBackend(model, tok, model_id, grammars=tiny_backend.grammars)
    before = again.grammars.compiled
    assert again.grammars is tiny_backend.grammars
    again.grammars.grammar(schema)
    assert again.grammars.compiled == before
    tok.eos_token = tok.convert_ids_to_tokens(1)  # another stop token: the old masks would end rows wrongly
    other = TransformersBackend(model, tok, model_id, grammars=tiny_backend.grammars)
    assert other.grammars is not tiny_backend.grammars and other.grammars.vocabulary != again.grammars.vocabulary


@pytest.mark.timeout(120)
def test_a_burst_of_one_new_schema_compiles_it_once(tiny_backend):
    """A client sends its first calls at once (the memory system's batch of extraction windows): one compile,
    the others wait for it rather than compiling the same grammar in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    before = tiny_backend.grammars.compiled
    schema = extraction_schema(max_facts=5, max_chars=11)
    with ThreadPoolExecutor(6) as pool:
        grammars = list(pool.map(lambda _: tiny_backend.grammars.grammar(schema), range(6)))
    assert tiny_backend.grammars.compiled == before + 1
    assert all(g is grammars[0] for g in grammars)


@pytest.mark.timeout(300)
def test_mixed_operations_keep_input_order(tiny_backend):
    schema = generation_schema(max_chars=8)
    requests = [free(PROMPTS[0], 5),
                GenerationRequest("generation", TEMPLATES["generation"].messages("Question: x"), 20, schema),
                free(PROMPTS[1], 5)]
    results = tiny_backend.generate(requests)
    assert [r.constrained for r in results] == [False, True, False]
    assert results[0].text == tiny_backend.generate([requests[0]])[0].text


@pytest.mark.timeout(300)
def test_prefix_cache_changes_nothing_but_speed(tiny_backend):
    from memlora.llm.hf_backend import TransformersBackend

    plain = TransformersBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", batch_size=8,
                                logprobs_top_k=4, prefix_cache=False)
    schema = extraction_schema(max_facts=2, max_chars=12)
    for requests in ([free(p) for p in PROMPTS], [extraction(p, schema) for p in PROMPTS]):
        cached = tiny_backend.generate(requests)
        uncached = plain.generate(requests)
        assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]
        assert [r.prompt_tokens for r in cached] == [r.prompt_tokens for r in uncached]
        for a, b in zip(cached, uncached):
            assert [t for t, _ in a.top_logprobs[0]] == [t for t, _ in b.top_logprobs[0]]
    assert len(tiny_backend._prefixes) >= 1 and not plain._prefixes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_teacher_every_constrained_output_validates(teacher_backend):
    """The bundled SmolLM2-135M under the extraction and update schemas: all rows parse and validate."""
    ex_schema = extraction_schema(max_facts=3, max_chars=80)
    requests = [extraction(p, ex_schema, n=160) for p in PROMPTS[:4]]
    for n_shown in (0, 2):
        shown = [type("M", (), {"text": t})() for t in ("Ann has a cat", "Ben lives in Boston")[:n_shown]]
        ids = [str(i) for i in range(n_shown)]
        requests.append(GenerationRequest("update", TEMPLATES["update"].messages(
            render_update(shown, "Ben moved to Denver", str(n_shown))), 160, update_schema(ids, str(n_shown), 80)))
    results = teacher_backend.generate(requests)
    for request, r in zip(requests, results):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), request.schema)


@pytest.mark.timeout(30)
def test_ngram_block_counts_the_output_only_and_never_leaves_the_grammar_nothing():
    import torch

    from memlora.llm.decoding import block_ngrams

    # The completions so far (the prompt is not passed: copying a phrase of the input is allowed).
    completions = [[1, 2, 3, 1, 2], [1, 2, 5, 6, 7]]
    scores = torch.zeros(2, 10)
    block_ngrams(scores, completions, 3)
    assert scores[0, 3] == float("-inf") and torch.isfinite(scores[0, :3]).all()  # "1 2 3" again: banned
    assert torch.isfinite(scores[1]).all()  # "6 7" never seen followed by anything: nothing banned
    only = torch.full((1, 10), float("-inf"))
    only[0, 3] = 0.0  # the grammar allows just the token the block would ban: it stays
    block_ngrams(only, completions[:1], 3)
    assert only[0, 3] == 0.0


@pytest.mark.timeout(120)
def test_trace_rows_record_the_ngram_block_and_old_shards_read_it_as_null(tiny_backend, tmp_path):
    import json

    from memlora.data.io import read_parquet
    from memlora.data.schemas import TRACES
    from memlora.memory.llm import GenerationRequest
    from tests.conftest import REPO

    request = GenerationRequest("generation", [{"role": "user", "content": "Say hello hello hello."}], 24,
                                no_repeat_ngram=2)
    result = tiny_backend.generate([request])[0]
    assert result.extra["decoding"] == {"no_repeat_ngram": 2}
    ids = result.token_ids
    pairs = list(zip(ids, ids[1:]))
    assert len(pairs) == len(set(pairs))  # no bigram twice in the output
    import pyarrow as pa

    from memlora.memory.parsing import parse_generation
    from memlora.memory.system import CallRecord
    from memlora.teacher.traces import record_to_row

    row = record_to_row(CallRecord("generation", "c1", 1, 0, request, result, parse_generation(result.text), "h"),
                        "tiny", "transformers")
    assert json.loads(pa.Table.from_pylist([row], schema=TRACES).column("decoding")[0].as_py()) == {"no_repeat_ngram": 2}
    old = read_parquet(REPO / "bench" / "data" / "traces" / "extraction" / "part-sample-1.parquet", "traces", TRACES)
    assert old.column("decoding").null_count == old.num_rows


@pytest.mark.timeout(300)
def test_rows_leaving_the_batch_change_no_token_against_generate(tiny_backend):
    """`greedy_decode` drops finished rows; `model.generate` keeps them to the end. Same tokens, same stops."""
    import torch
    from xgrammar.contrib.hf import LogitsProcessor

    schema = extraction_schema(4, 160)
    lengths = set()
    for requests in ([free(t, 20) for t in PROMPTS], [extraction(t, schema, 40) for t in PROMPTS]):
        ours = tiny_backend.generate(requests)
        with torch.inference_mode():
            enc, cache, _ = tiny_backend._encode(requests)
            processors = [LogitsProcessor([tiny_backend.grammars.grammar(schema)] * len(requests))] \
                if requests[0].constrained else []
            out = tiny_backend.model.generate(**enc, past_key_values=cache, max_new_tokens=requests[0].max_new_tokens,
                                              do_sample=False, logits_processor=processors, temperature=None,
                                              top_p=None, top_k=None, pad_token_id=tiny_backend.tokenizer.pad_token_id)
        for result, seq in zip(ours, out[:, enc["input_ids"].shape[1]:].tolist()):
            stop = next((i for i, t in enumerate(seq) if t in tiny_backend.stop_ids), None)
            assert result.token_ids == seq[:stop]
            assert result.finish_reason == ("length" if stop is None else "stop")
        lengths |= {len(r.token_ids) for r in ours}
    assert len(lengths) > 1  # rows did end at different steps


@pytest.mark.timeout(120)
def test_constrained_output_follows_the_schemas_property_order(tiny_backend):
    """An update entry is written id, text, event, as the prompt's examples show (a grammar compiled from the
    sorted schema once made every entry begin with "event": the model chose before writing anything)."""
    schema = update_schema(["0"], "1", max_chars=10)
    request = GenerationRequest("update", TEMPLATES["update"].messages(
        render_update([type("M", (), {"text": "memory 0"})()], "Ann has a cat", "1")), 240, schema)
    value = json.loads(tiny_backend.generate([request])[0].text)
    for entry in value["memory"]:
        assert list(entry)[:3] == ["id", "text", "event"]


@pytest.mark.timeout(300)
def test_compact_update_output_is_id_and_event_where_nothing_is_new(tiny_backend):
    """`memory.update_output: compact`: every constrained entry writes its event right after its id, and a NONE
    or DELETE entry is those two alone; the parser takes it and the store gets no text from it."""
    requests = []
    for n_shown in (0, 1, 3, 2):
        shown = [type("M", (), {"text": f"memory {i}"})() for i in range(n_shown)]
        requests.append(GenerationRequest("update", COMPACT_UPDATE.messages(
            render_update(shown, "Ann has a cat", str(n_shown))), 240,
            update_schema([str(i) for i in range(n_shown)], str(n_shown), max_chars=10, compact=True)))
    events = set()
    for request, r, n_shown in zip(requests, tiny_backend.generate(requests), (0, 1, 3, 2)):
        value = json.loads(r.text)
        jsonschema.validate(value, request.schema)
        for entry in value["memory"]:
            assert list(entry)[:2] == ["id", "event"], r.text
            assert (set(entry) == {"id", "event"}) == (entry["event"] in ("NONE", "DELETE")), r.text
            events.add(entry["event"])
        parsed = parse_update(r.text, [str(i) for i in range(n_shown)], str(n_shown))
        assert parsed.ok, parsed.error
    assert events & {"NONE", "DELETE"}, events  # the short form was exercised, not only ADD


@pytest.mark.timeout(120)
def test_rows_first_linears_match_f_linear(tiny_model_dir):
    """The CPU decode product (W @ x^T)^T gives F.linear's outputs, with and without bias, for decode-sized (one
    row too, multiplied as two) and prefill-sized inputs, and the patched model's logits equal the plain model's."""
    import torch

    from memlora.llm.cpu_matmul import ROWS_FIRST_MAX, use_rows_first_linears
    from memlora.llm.hf_backend import load_causal_lm

    torch.manual_seed(0)
    for bias in (False, True):
        layer = torch.nn.Linear(48, 80, bias=bias)
        patched = torch.nn.Linear(48, 80, bias=bias)
        patched.load_state_dict(layer.state_dict())
        assert use_rows_first_linears(patched) == 1
        for shape in [(8, 48), (8, 1, 48), (2, 3, 48), (1, 48), (1, 1, 48), (1, ROWS_FIRST_MAX + 1, 48)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(patched(x), layer(x), rtol=1e-5, atol=1e-6)

    plain, tok, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    fast, _, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    assert use_rows_first_linears(fast) > 0
    ids = torch.tensor(tok(["hello there", "a memory"], padding=True)["input_ids"])
    with torch.inference_mode():
        torch.testing.assert_close(fast(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(120)
def test_the_decode_product_is_this_machines_faster_or_the_one_asked_for(tiny_model_dir, monkeypatch):
    """`MEMLORA_CPU_DECODE_PRODUCT` fixes the product (rows first patched in, or torch's left alone; anything else
    refused by name); `auto` keeps torch's on a model too small to time, and times both products on a real-sized
    weight and picks one."""
    import torch

    from memlora.llm import cpu_matmul
    from memlora.llm.hf_backend import load_causal_lm

    def patched(model) -> int:
        return sum("forward" in vars(m) for m in model.modules() if type(m) is torch.nn.Linear)

    for product, expected in (("rows_first", True), ("linear", False)):
        monkeypatch.setenv(cpu_matmul.PRODUCT_ENV, product)
        model, _, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
        assert cpu_matmul.use_fastest_decode_product(model) == product
        assert (patched(model) > 0) is expected
    monkeypatch.setenv(cpu_matmul.PRODUCT_ENV, "fastest")
    with pytest.raises(ValueError, match=cpu_matmul.PRODUCT_ENV):
        cpu_matmul.decode_product(model)
    monkeypatch.setenv(cpu_matmul.PRODUCT_ENV, "auto")
    model, _, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    assert cpu_matmul.use_fastest_decode_product(model) == "linear" and patched(model) == 0
    weight = torch.randn(8192, 576)
    seconds = cpu_matmul.time_products(weight)
    assert set(seconds) == set(cpu_matmul.PRODUCTS) and all(s > 0 for s in seconds.values())
    big = torch.nn.Sequential(torch.nn.Linear(576, 8192, bias=False))
    big[0].weight.data = weight
    assert cpu_matmul.decode_product(big) in cpu_matmul.PRODUCTS


@pytest.mark.timeout(120)
def test_an_int8_teacher_runs_quantized_linears_and_keeps_the_schema(tiny_model_dir):
    """`teacher.quantize: int8`: the loaded model's linear layers run on int8 weights and constrained output still
    validates; a remote teacher cannot be asked to quantize (its server does)."""
    import pydantic

    from memlora.config import LLMConfig
    from memlora.llm.hf_backend import TransformersBackend
    from memlora.llm.quantize import is_quantized

    backend = TransformersBackend.from_config(LLMConfig(model=str(tiny_model_dir), device="cpu", quantize="int8"))
    layers = [m for name, m in backend.model.named_modules() if name.endswith("q_proj")]
    assert layers and all(is_quantized(m) for m in layers)
    schema = extraction_schema(max_facts=2, max_chars=12)
    for r in backend.generate([extraction(p, schema) for p in PROMPTS[:2]]):
        assert r.constrained and r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
    with pytest.raises(pydantic.ValidationError, match="quantize: int8 applies to a local model"):
        LLMConfig(backend="openai", model="teacher", quantize="int8")
