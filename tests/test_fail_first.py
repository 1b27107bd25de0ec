"""Commands refuse at once, before any expensive step, when an input they will need is missing."""

from __future__ import annotations

import pytest


@pytest.mark.timeout(60)
def test_evaluate_without_experts_refuses_before_building_anything(sample_path, tmp_path):
    from memlora.config import load_config
    from memlora.data.ingest import ingest
    from memlora.evaluation.runner import prepare
    from memlora.evaluation.systems import EvalError
    from tests.conftest import REPO

    config = load_config(REPO / "configs" / "default.yaml")
    out = tmp_path / "out"
    ingest(str(sample_path), out, config.data)
    with pytest.raises(EvalError, match="no trained expert"):
        prepare(config, out)
    assert not (out / "student").exists()  # the student base was not built first
