"""Expert switching: the backend's switch between operations (`ExpertBackend.use`, every expert resident) vs
loading the operation's expert again through peft, and the memory all three experts add to the bare student.
Writes bench/results/expert_switching.json.

    python bench/expert_switching.py [--quick] [--out OUT]   (OUT: use its trained experts)
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, save, spread, student_with_experts, table  # noqa: E402


def loaded(make) -> tuple[object, float]:
    """What `make()` returns and the resident memory (MiB) it added."""
    from memlora.evaluation.probes import current_rss_mb

    gc.collect()
    start = current_rss_mb()
    value = make()
    gc.collect()
    return value, current_rss_mb() - start


def main() -> None:
    args = bench_parser(__doc__).parse_args()
    switches, reloads = (30, 2) if args.quick else (300, 6)

    from memlora.config import OPERATIONS
    from memlora.evaluation.probes import parameter_counts
    from memlora.student.experts import ExpertBackend, adapter_name, verified_expert_folders

    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base, experts_out = student_with_experts(args.out, Path(scratch))
        folders = verified_expert_folders(experts_out)

        bare, rss_bare = loaded(lambda: ExpertBackend(base, None, device="cpu"))
        bare_params = parameter_counts(bare.model)
        del bare
        backend, rss_experts = loaded(lambda: ExpertBackend(base, folders, device="cpu"))
        counts = parameter_counts(backend.model)

        # the backend's switch, cycling through the operations (each call is a real switch)
        cycle = [OPERATIONS[i % len(OPERATIONS)] for i in range(switches + 1)]
        backend.use(cycle[0])
        switch_times = []
        for op in cycle[1:]:
            t0 = time.perf_counter()
            backend.use(op)
            switch_times.append(time.perf_counter() - t0)

        del backend
        gc.collect()
        # The alternative without resident experts: peft drops the adapter and loads it again from disk.
        from peft import PeftModel

        from memlora.llm.hf_backend import load_causal_lm

        model = PeftModel.from_pretrained(load_causal_lm(str(base), device="cpu")[0], str(folders[OPERATIONS[0]]),
                                          adapter_name="resident", use_safetensors=True)  # never dropped
        reload_times = []
        for i in range(reloads):
            op = OPERATIONS[i % len(OPERATIONS)]
            name = adapter_name(op)
            if name in model.peft_config:
                model.delete_adapter(name)
            t0 = time.perf_counter()
            model.load_adapter(str(folders[op]), adapter_name=name, use_safetensors=True)
            model.set_adapter(name)
            reload_times.append(time.perf_counter() - t0)

    adapter_params = counts.get("adapters", sum(v for k, v in counts.items() if k != "base"))
    base_params = bare_params.get("base", sum(bare_params.values()))
    switch, reload = spread(switch_times), spread(reload_times)
    rows = [
        {"what": "switch (resident experts)", "median_ms": f"{switch['median'] * 1e3:.3f}",
         "min_ms": f"{switch['min'] * 1e3:.3f}", "max_ms": f"{switch['max'] * 1e3:.3f}", "n": len(switch_times)},
        {"what": "reload from disk", "median_ms": f"{reload['median'] * 1e3:.1f}",
         "min_ms": f"{reload['min'] * 1e3:.1f}", "max_ms": f"{reload['max'] * 1e3:.1f}", "n": len(reload_times)},
    ]
    print(table(rows, list(rows[0])))
    print(f"reload / switch: {reload['median'] / switch['median']:.0f}x (target: switch <= 1 ms)")
    print(f"parameters: base {base_params:,}, three experts {adapter_params:,} = "
          f"{adapter_params / base_params:.2%} of the student (target <= 5 %)")
    print(f"RSS added by loading: bare student {rss_bare:.0f} MiB, student + 3 experts {rss_experts:.0f} MiB "
          f"(experts add {rss_experts - rss_bare:.0f} MiB = {(rss_experts - rss_bare) / max(rss_bare, 1):.1%})")
    print("saved", save("expert_switching", {
        "switch_s": switch, "reload_s": reload, "reload_over_switch": reload["median"] / switch["median"],
        "parameters": {"base": base_params, "experts": adapter_params, "ratio": adapter_params / base_params,
                       "detail": counts},
        "rss_mb": {"bare_student": rss_bare, "student_with_experts": rss_experts},
        "switches": len(switch_times), "reloads": len(reload_times)}))


if __name__ == "__main__":
    main()
