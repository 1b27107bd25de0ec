"""Schema-constrained decoding through xgrammar, the structured-generation engine vLLM and SGLang use.

Grammars are compiled once per (schema, tokenizer) and cached: an update prompt's id enum only ranges over
0..top_k, so a whole run compiles a handful of grammars, and each batch row still gets its own. The cache is an
LRU of bounded size (a server's clients may send any number of schemas; each compiled grammar holds a few MiB),
and xgrammar's own compiler cache is off so that this bound is the only one.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future

import xgrammar as xgr

DEFAULT_SIZE = 64


def vocabulary_of(tokenizer, vocab_size: int) -> tuple[xgr.TokenizerInfo, str]:
    """What xgrammar compiles against, and its fingerprint (two tokenizers with the same one share grammars)."""
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    return info, hashlib.sha256(info.serialize_json().encode()).hexdigest()


class GrammarCache:
    def __init__(self, tokenizer, vocab_size: int, max_size: int = DEFAULT_SIZE):
        info, self.vocabulary = vocabulary_of(tokenizer, vocab_size)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}  # schemas being compiled now
        self.max_size = max_size
        self.compiled = 0

    def __len__(self) -> int:
        return len(self._cache)

    def fits(self, tokenizer, vocab_size: int) -> bool:
        """Whether this cache's grammars are valid for `tokenizer` (a reloaded backend keeps what it compiled:
        an update schema takes ~1.8 s to compile on 2 cores)."""
        return vocabulary_of(tokenizer, vocab_size)[1] == self.vocabulary

    def grammar(self, schema: dict) -> xgr.CompiledGrammar:
        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            pending = self._pending.get(key)
            if pending is None:  # the first asker compiles; the others (a client's burst of one schema) wait on it
                pending = self._pending[key] = Future()
                pending.set_running_or_notify_cancel()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        # Compiled outside the lock (xgrammar releases the GIL): a slow schema delays only its own request, never
        # a batch that looks up a grammar it already has. Compact JSON (no free whitespace): the model cannot pad
        # its output with endless spaces. The schema as written, not the sorted key: xgrammar emits properties in
        # the schema's order, and sorted they would make the model write an update's "event" before its "id" and
        # "text" (the opposite of the prompts' examples).
        try:
            compiled = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        except BaseException as err:
            with self._lock:
                self._pending.pop(key, None)
            pending.set_exception(err)
            raise
        with self._lock:
            self.compiled += 1
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_size:
                self._cache.popitem(last=False)
            self._pending.pop(key, None)
        pending.set_result(compiled)
        return compiled
