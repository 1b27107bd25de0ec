"""Arrow schemas of the datasets downstream teams read; the version travels in each file's metadata."""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
VERSION_KEY = b"memlora.schema_version"
KIND_KEY = b"memlora.kind"

CONVERSATIONS = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("session", pa.int32(), nullable=False),
        pa.field("turn", pa.int32(), nullable=False),
        pa.field("dia_id", pa.string(), nullable=False),
        pa.field("speaker", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("s"), nullable=False),
        pa.field("image_caption", pa.string()),
    ]
)

QUESTIONS = pa.schema(
    [
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("question_id", pa.int32(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("answer", pa.string()),
        pa.field("adversarial_answer", pa.string()),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("evidence", pa.list_(pa.string()), nullable=False),
    ]
)

MESSAGE = pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())])
TOP_LOGPROB = pa.struct([pa.field("token_id", pa.int32()), pa.field("logprob", pa.float32())])

TRACES = pa.schema(
    [
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("operation", pa.string(), nullable=False),
        pa.field("conversation_id", pa.string(), nullable=False),
        pa.field("session", pa.int32(), nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE), nullable=False),
        pa.field("output_schema", pa.string()),
        pa.field("raw_output", pa.string(), nullable=False),
        pa.field("parsed_output", pa.string()),
        pa.field("parse_ok", pa.bool_(), nullable=False),
        pa.field("parse_error", pa.string()),
        pa.field("constrained", pa.bool_(), nullable=False),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32(), nullable=False),
        pa.field("completion_tokens", pa.int32(), nullable=False),
        pa.field("completion_token_ids", pa.list_(pa.int32())),
        pa.field("top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
        pa.field("latency_s", pa.float64(), nullable=False),
        pa.field("batch_size", pa.int32(), nullable=False),
        pa.field("model_id", pa.string(), nullable=False),
        pa.field("backend", pa.string(), nullable=False),
        pa.field("template_hash", pa.string(), nullable=False),
        # Decoding settings beyond greedy + schema, as JSON (e.g. {"no_repeat_ngram": 8}); null: none.
        pa.field("decoding", pa.string()),
    ]
)

# Nullable columns added within a schema version: a file written before them reads them as null.
ADDED_COLUMNS = {"traces": {"decoding"}}

SCHEMAS = {"conversations": CONVERSATIONS, "questions": QUESTIONS, "traces": TRACES}


def with_metadata(schema: pa.Schema, kind: str) -> pa.Schema:
    return schema.with_metadata({VERSION_KEY: SCHEMA_VERSION.encode(), KIND_KEY: kind.encode()})
