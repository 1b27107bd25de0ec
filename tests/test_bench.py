"""The benches keep working: each runs in `--quick` mode (tiny sizes, one repeat) and writes its results
file. No timing is asserted here: the numbers are the benches' to print, not the tests' to judge."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

QUICK = {
    "teacher_generation": ["rows", "free_over_constrained_wall"],
    "decode_eviction": ["rows", "total_speedup"],
    "kv_in_place": ["rows", "total_speedup"],
    "continuous_batching": ["rows", "merged_over_running_wall", "identical_calls"],
    "continuous_serving": ["rows", "merged_over_running_wall", "identical_answers"],
    "continuous_serving_experts": ["rows", "merged_over_running_wall", "identical_answers"],
    "serving_cost": ["latency_ratio_per_call", "peak_rss_ratio", "memory"],
    "expert_switching": ["switch_s", "reload_s", "parameters"],
    "training_step": ["delora_over_lora", "bf16_over_float32"],
    "mixed_batch": ["speedup", "identical_outputs"],
    "http_serving": ["rows", "stream_rows", "records"],
    "methods": ["runs", "steps", "training_rows"],
    "data_scaling": ["rows", "sizes", "held_out_calls"],
    "bandwidth_floor": ["bandwidth", "rows"],
    "teacher_quantize": ["rows", "tokens_per_s", "int8_over_float32_speed"],
    "int8_designs": ["rows", "calls"],
    "int8_logits": ["rows", "down_proj_outliers"],
    "gpu_paths": ["environment", "experts", "decode"],
    "compaction": ["rows", "shards", "merged"],
}
# results written under another name than the bench's file: (file, its arguments)
VARIANTS = {"continuous_serving_experts": ("continuous_serving", ["--experts"])}


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory) -> Path:
    """One OUT for every bench: the bundled sample traces, the pruned student and its experts, made once."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import CONFIG, SAMPLE_TRACES, student_with_experts

    from memlora.config import load_config

    out = tmp_path_factory.mktemp("bench-out")
    shutil.copytree(SAMPLE_TRACES, out / "traces")
    # A 10-layer student keeps the smoke runs short; the benches use OUT's student as it is.
    config = load_config(CONFIG)
    light = config.model_copy(update={"student": config.student.model_copy(
        update={"prune": config.student.prune.model_copy(update={"drop": None, "every": 3})})})
    student_with_experts(None, out, light)
    return out


@pytest.mark.timeout(420)
@pytest.mark.parametrize("name", list(QUICK))
def test_bench_quick_mode_runs_and_writes_its_results(name, bench_out, tmp_path):
    # The DeepSpeed 1-vs-2-ranks half of training_step is left to `make bench`: test_distill_launcher runs
    # the same launcher with two ranks.
    script, extra = VARIANTS.get(name, (name, []))
    extra = extra + (["--no-ranks"] if name == "training_step" else [])
    env = dict(os.environ, MEMLORA_BENCH_RESULTS=str(tmp_path))
    result = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), "--quick", "--out", str(bench_out),
                             *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["machine"]["cpus"] >= 1
    section = saved.get("delora_vs_lora", saved)
    for key in QUICK[name]:
        assert key in section, f"{name}: {key} missing from its results"
    assert "x" in result.stdout  # a ratio was printed


@pytest.mark.timeout(30)
def test_targets_bench_variants_set_what_they_name():
    """bench/targets.py trains each variant with OUT's recipe changed in the one setting its name says."""
    sys.path.insert(0, str(REPO / "bench"))
    from targets import variant_config

    from memlora.config import load_config

    config = load_config(REPO / "configs" / "default.yaml")
    weighted = variant_config(config, "update", "weight5", seed=2).distill
    assert weighted.targets.event_weight == 5.0 and weighted.seed == 2
    assert weighted.targets.model_copy(update={"event_weight": 1.0}) == config.distill.targets
    assert variant_config(config, "update", "balanced").distill.targets.balance_update is True
    assert variant_config(config, "update", "unbalanced").distill.seed == config.distill.seed
    with pytest.raises(SystemExit, match="unknown update variant"):
        variant_config(config, "update", "louder")


@pytest.mark.timeout(120)
def test_targets_bench_reads_the_teachers_confidence_in_its_update_events(bench_out):
    """Each update trace row's event is found in its tokens and its probability read from the row's top-k."""
    sys.path.insert(0, str(REPO / "bench"))
    from common import CONFIG
    from targets import teacher_event_confidence

    from memlora.config import load_config
    from memlora.student.examples import load_traces, update_event

    confidence = teacher_event_confidence(bench_out, load_config(CONFIG))
    rows = [r for r in load_traces(sorted((bench_out / "traces" / "update").glob("*.parquet"))).to_pylist()
            if r["parse_ok"] and r["top_logprobs"]]
    assert sum(c["rows"] for c in confidence.values()) == len(rows) > 0
    assert set(confidence) == {update_event(r["raw_output"]) for r in rows}
    assert all(0 < c["median"] <= 1 and c["under_0.6"] + c["over_0.9"] <= c["rows"] for c in confidence.values())
