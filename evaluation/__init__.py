"""Evaluation: replay held-out conversations through the memory system with the teacher, the bare student and the
student with its experts, and compare them on agreement with the teacher, end-to-end QA, memory and latency.

Modules, one job each: `scoring` (metrics through `evaluate`, loaded by path from `metrics/`), `stats`
(confidence intervals), `systems` (the backends compared), `served` (the experts as served, judged call by
call on the deferral thresholds), `replay` (recording and teacher-forced replay of calls),
`agreement`, `qa` (end-to-end QA and the LLM judge), `probes` (memory and parameter counts), `run_system` (one
system in its own process), `runner` (starts those processes), `results` (results.parquet), `report`
(Markdown + PNG). Nothing here imports Prefect.
"""
