"""Mem0 2.x as a user runs it against an OpenAI-compatible URL, in a process of its own: it cannot share an
environment with the Mem0 1.0.11 the other tests import, so `make setup` installs it apart (.mem0-v2, put first
on PYTHONPATH by the test). Adds turns of a bundled conversation, a few per add(), then prints one JSON line:
the Mem0 version, what add() returned, and what Mem0 stored for the user.

    PYTHONPATH=.mem0-v2 python tests/mem0_v2_driver.py URL MODEL FOLDER CONVERSATION_INDEX ADDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from memlora.data.loaders import LoadOptions, load_corpus
from memlora.mem0_client import mem0_memory, mem0_messages

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "locomo_sample12.json"


def main() -> None:
    url, model, folder, index, adds = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    import mem0

    conversation = load_corpus(SAMPLE, LoadOptions())[index]
    memory = mem0_memory(url, model, folder, max_tokens=300)
    results, errors = [], []
    for start in range(0, 4 * adds, 4):
        try:
            results += memory.add(mem0_messages(conversation, start), user_id=conversation.conversation_id)["results"]
        except Exception as err:  # noqa: BLE001  (Mem0 2.x raises LLMError when its LLM call fails)
            errors.append(f"{type(err).__name__}: {err}")
    stored = memory.get_all(filters={"user_id": conversation.conversation_id})["results"]
    print(json.dumps({"version": mem0.__version__, "added": results, "errors": errors,
                      "stored": [m.get("memory") for m in stored]}))


if __name__ == "__main__":
    main()
