import numpy as np

from memlora.memory.store import MemoryStore


def vec(*values):
    v = np.zeros(8, dtype=np.float32)
    v[: len(values)] = values
    return v


def test_add_update_delete_search_and_history(tmp_path):
    path = tmp_path / "mem.sqlite"
    store = MemoryStore(path)
    a = store.add("c1", "Ann has a cat", vec(1, 0), "2023-05-08T13:56:00")
    b = store.add("c1", "Ann bakes bread", vec(0, 1), "2023-05-08T13:56:00")
    store.add("c2", "other conversation", vec(1, 0), "2023-05-08T13:56:00")
    hits = store.search("c1", vec(0.9, 0.1), k=5)
    assert [m.id for m, _ in hits] == [a, b]  # namespaces never mix
    assert hits[0][1] > hits[1][1]
    assert store.update("c1", a, "Ann has two cats", vec(1, 0.2), "2023-06-01T10:00:00")
    assert store.get("c1", a).text == "Ann has two cats"
    assert store.get("c1", a).updated_at == "2023-06-01T10:00:00"
    assert store.delete("c1", b)
    assert not store.delete("c1", b)
    assert not store.update("c1", "nope", "x", vec(1), "t")
    assert [m.text for m in store.all("c1")] == ["Ann has two cats"]
    assert [e for _, e, *_ in store.history("c1")] == ["ADD", "ADD", "UPDATE", "DELETE"]
    store.close()
    reopened = MemoryStore(path)  # persistent
    assert [m.text for m in reopened.all("c1")] == ["Ann has two cats"]
    assert reopened.search("empty", vec(1), 3) == []
    reopened.clear("c1")
    assert reopened.all("c1") == [] and len(reopened.all("c2")) == 1


def test_search_with_real_embeddings(embedder):
    store = MemoryStore()
    texts = ["Ann adopted a puppy named Max", "Ben works as a nurse in Boston", "Ann likes hiking in the Alps"]
    for t, v in zip(texts, embedder.encode(texts)):
        store.add("c", t, v, "2023-05-08")
    best, score = store.search("c", embedder.encode(["What is the name of Ann's dog?"])[0], 1)[0]
    assert best.text == texts[0] and 0 < score <= 1.0001
