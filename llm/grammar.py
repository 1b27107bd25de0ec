"""Schema-constrained decoding through xgrammar, the structured-generation engine vLLM and SGLang use.

Grammars are compiled once per (schema, tokenizer) and cached: an update prompt's id enum only ranges over
0..top_k, so a whole run compiles a handful of grammars, and each batch row still gets its own.
"""

from __future__ import annotations

import json
import threading

import xgrammar as xgr


class GrammarCache:
    def __init__(self, tokenizer, vocab_size: int):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info)
        self._cache: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()
        self.compiled = 0

    def grammar(self, schema: dict) -> xgr.CompiledGrammar:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key not in self._cache:
                # Compact JSON (no free whitespace): the model cannot pad its output with endless spaces. The
                # schema as written, not the sorted key: xgrammar emits properties in the schema's order, and
                # sorted they would make the model write an update's "event" before its "id" and "text" (the
                # opposite of the prompts' examples).
                self._cache[key] = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
                self.compiled += 1
            return self._cache[key]
