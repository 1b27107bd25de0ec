"""The language-model runtime the teacher, the student and the judge share: loading (hub id, folder, GGUF,
package), batched greedy decoding with schema constraints, the OpenAI-compatible client, the micro-batcher."""
