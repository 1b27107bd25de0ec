"""`memlora` command line: a thin layer over the flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from memlora.bundled import DEFAULT_CONFIG, DEFAULT_DATA, bundled
from memlora.evaluation.report import headline_text
from memlora.layout import manifest_path, releases_root, report_path, results_path
from memlora.models import go_offline

go_offline()
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _known_errors() -> tuple[type[BaseException], ...]:
    from memlora.config import ConfigError
    from memlora.data.io import DataError
    from memlora.evaluation.calibration import CalibrationError
    from memlora.llm.fallback import FallbackError
    from memlora.llm.http_backend import SchemaRejected, TeacherUnavailable
    from memlora.manifest import UntrustedArtifact
    from memlora.models import ModelRefError
    from memlora.outlock import OutBusy, OutMissing
    from memlora.release import VerifyError
    from memlora.student.export import ExportRefused
    from memlora.student.launch import TrainingFailed
    from memlora.llm.client_template import TemplateError
    from memlora.teacher.traces import TracesIncomplete

    return (UsageError, ConfigError, DataError, ModelRefError, TracesIncomplete, TrainingFailed, TeacherUnavailable,
            SchemaRejected, UntrustedArtifact, VerifyError, ExportRefused, CalibrationError, FallbackError,
            TemplateError, OutBusy, OutMissing)


class UsageError(ValueError):
    """A command-line argument that cannot be used; exit 2 with one line."""


def check_out(args) -> None:
    out = getattr(args, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out {out}: is a file; OUT must be a folder")
    if args.command in WORK_ON_OUT and not (args.command == "evaluate" and args.data):
        from memlora.outlock import require_out  # the flows' own check, made before a Prefect server starts

        require_out(out, args.command)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def port_number(text: str) -> int:
    port = int(text)  # not a number: argparse says "invalid port_number value"
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 1-65535")
    return port


def http_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
    return text


def check_address(args) -> None:
    """A server's address is tried before anything loads: a port in use is one line at once, not a uvicorn error
    after the models have loaded. (Bound as uvicorn binds it, with SO_REUSEADDR, and released at once.)"""
    import errno
    import socket

    if args.command not in SERVERS:
        return
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((args.host, args.port))
        except OSError as err:
            hint = "; choose another port" if err.errno == errno.EADDRINUSE else ""
            raise UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({err.strerror}){hint}") \
                from None
    if not loopback(args.host):  # bound to localhost unless configured: a configured exposure is said out loud
        open_to_all = "" if getattr(args, "api_key_env", None) else ", and it asks them for no key" + (
            " (--api-key-env)" if hasattr(args, "api_key_env") else "")
        print(f"warning: --host {args.host}: other machines can reach this server{open_to_all}", file=sys.stderr,
              flush=True)


def loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


WORK_ON_OUT = ("distill", "evaluate", "improve")  # flows on an existing OUT: a missing one is an error, not created
# Commands that change OUT outside a flow (the flows hold OUT's lock themselves): they take turns with the
# nightly runs on the same OUT (memlora.outlock).
WRITERS = ("ingest", "compact", "rollback", "calibrate", "templates", "export", "release")


def writing_out(args):
    from contextlib import nullcontext

    from memlora.outlock import out_lock

    if args.command not in WRITERS or (args.command == "rollback" and not args.to) or not Path(args.out).is_dir():
        return nullcontext()  # a listing only reads; a new OUT has no one to wait for
    say = lambda who: print(f"memlora {args.command}: {args.out} is in use by {who}; waiting for it to finish "  # noqa: E731
                            "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    return out_lock(args.out, f"memlora {args.command}", on_wait=say)


def check_data(args) -> list:
    """Read and validate --data before a flow starts: a bad file costs a second and one line, not a Prefect
    run with two tracebacks. Returns the corpus as split."""
    from memlora.config import load_config
    from memlora.data.ingest import prepare_corpus

    return prepare_corpus(args.data, load_config(args.config).data)  # a split naming a missing conversation too


def cmd_ingest(args) -> int:
    from memlora.config import load_config
    from memlora.data.ingest import ingest
    from memlora.manifest import update_manifest

    corpus = ingest(args.data, args.out, load_config(args.config).data)
    update_manifest(args.out)  # the new datasets described, so `memlora verify` and a release see them as OUT's
    turns = sum(len(c.turns) for c in corpus)
    questions = sum(len(c.questions) for c in corpus)
    print(f"{len(corpus)} conversations, {turns} turns, {questions} questions -> {Path(args.out) / 'datasets'}")
    return 0


def cmd_traces(args) -> int:
    check_data(args)  # a bad config or data file fails before Prefect is even imported
    from memlora.flows.traces import generate_traces

    summary = generate_traces(config_path=args.config, data=args.data, out=args.out)
    for op, s in summary.items():
        print(f"{op:<11} {s['rows']:>5} calls  {s['parse_ok']:>5} parsed  -> {Path(args.out) / 'traces' / op}")
    return 0


def cmd_distill(args) -> int:
    from memlora.config import load_config
    from memlora.flows.distill import distill

    load_config(args.config)
    records = distill(config_path=args.config, out=args.out)
    for op, r in records.items():
        if r.get("no_expert"):
            print(f"{op:<11} no expert: {r['reason']}")
            continue
        note = " (kept: already trained)" if r.get("skipped") else ""
        print(f"{op:<11} loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}  {r['steps']} steps{note}"
              f"  -> {Path(args.out) / 'adapters' / op}")
    return 0


def cmd_improve(args) -> int:
    from memlora.config import load_config
    from memlora.flows.improve import improve

    load_config(args.config)
    result = improve(config_path=args.config, out=args.out)
    if not result["promoted"] and not result.get("decisions"):
        print(f"no new trace rows since the served experts were trained ({result['new_rows'] or 'no traces'})"
              + (f"; the thresholds of {', '.join(result['recalibrated'])} refitted on the experts served now"
                 if result.get("recalibrated") else ""))
        return 0
    for d in result["decisions"]:
        print(f"{d['operation']:<11} {'PROMOTED' if d['promote'] else 'kept out'}: {d['reason']}")
    if result["version_before"]:
        print(f"the experts served before are version {result['version_before']} "
              f"(`memlora rollback --out {args.out} --to {result['version_before']}`)")
    return 0


def cmd_compact(args) -> int:
    from memlora.data.compaction import compact_traces
    from memlora.layout import traces_root
    from memlora.manifest import read_manifest, update_manifest

    if not Path(args.out).is_dir():
        print(f"memlora compact: {args.out}: no such folder (an OUT that capture or a run wrote)", file=sys.stderr)
        return 2
    done = compact_traces(traces_root(args.out), min_shards=args.min_shards, max_rows=args.max_rows)
    for c in done:
        merged = ", ".join(c.files) or "left as they are"
        print(f"{c.operation:<11} {c.shards} captured shards ({c.rows} rows) -> {merged}"
              + (f"; {c.finished} left by an interrupted compaction removed" if c.finished else ""))
    if not done:
        print(f"{traces_root(args.out)}: no traces")
    if any(c.shards or c.finished for c in done) and read_manifest(args.out):
        update_manifest(args.out)
    return 0


def cmd_rollback(args) -> int:
    from memlora.evaluation.deferral import stale_thresholds
    from memlora.student.versions import rollback, versions

    if not args.to:
        print("\n".join(versions(args.out)) or f"{args.out}: no versions yet")
        return 0
    ops = rollback(args.out, args.to)
    print(f"serving version {args.to} again ({', '.join(ops)}); a running serve-experts takes it within "
          "serving.reload_s")
    stale = stale_thresholds(args.out)
    if stale:
        print(f"its deferral thresholds were not kept with it: serve-experts defers every call of {', '.join(stale)} "
              "until `memlora calibrate` (or the nightly improve) refits them")
    return 0


def cmd_export(args) -> int:
    from memlora.student.export import export_lora

    written = export_lora(args.out, args.base, args.rank, on_line=lambda line: print(line, flush=True))
    if not written:
        print(f"memlora export: error: no trained experts under {Path(args.out) / 'adapters'}", file=sys.stderr)
        return 2
    return 0


def cmd_evaluate(args) -> int:
    from memlora.config import load_config
    from memlora.evaluation.captured import is_captured
    from memlora.evaluation.plan import check_evaluable
    from memlora.evaluation.systems import EvalError
    from memlora.flows.evaluation import evaluate

    config = load_config(args.config)
    try:
        if args.data:
            from memlora.evaluation.other_corpus import prepare_other_corpus

            if not args.experts_from:
                raise EvalError("--data needs --experts-from OUT: the run whose trained experts are evaluated")
            n = prepare_other_corpus(config, args.data, args.experts_from, args.out, args.sessions)
            print(f"evaluating the experts of {args.experts_from} on {n} conversation(s) of {args.data} in {args.out}")
        elif args.experts_from or args.sessions is not None:
            raise EvalError("--experts-from and --sessions go with --data: the conversations to evaluate on")
        if not is_captured(args.out):  # a captured OUT's checks are its own (evaluation.captured)
            check_evaluable(config, args.out)
        result = evaluate(config_path=args.config, out=args.out)
    except EvalError as err:
        print(f"memlora evaluate: error: {err}", file=sys.stderr)
        return 2
    print(headline_text(result["headline"]))
    print(f"results: {results_path(args.out)}  report: {report_path(args.out, '.md')}, {report_path(args.out, '.png')}")
    return 0


def cmd_verify(args) -> int:
    from memlora.release import VerifyError, verify_release

    try:
        problems = verify_release(args.path)
    except VerifyError as err:
        print(f"memlora verify: error: {err}", file=sys.stderr)
        return 2
    if problems:
        for problem in problems:
            print(f"memlora verify: {problem}", file=sys.stderr)
        print(f"memlora verify: {args.path}: {len(problems)} difference(s) from the manifest", file=sys.stderr)
        return 1
    print(f"{args.path}: matches its manifest")
    return 0


def cmd_release(args) -> int:
    from memlora.config import load_config
    from memlora.release import publish_release, release_files

    if not release_files(Path(args.out)):  # before --data: an OUT with nothing to release needs no data either
        raise UsageError(f"{args.out}: no Parquet datasets to release (run `memlora run`, or `memlora traces` or "
                         "`memlora capture`, into it first)")
    if args.data is None:
        from memlora.evaluation.captured import is_captured

        if not is_captured(args.out):
            raise UsageError(f"--data: required for {args.out}, whose datasets were made from conversations (it is "
                             "fingerprinted in the release); only an OUT of captured calls is released without it")
    published = publish_release(args.out, load_config(args.config), args.data, name=args.name)
    if published.new:
        print(f"release: {published.path}  (latest -> {published.path.name})")
    else:
        print(f"release: {published.path}  (unchanged: OUT's Parquet files are this release's; nothing published)")
    return 0


def cmd_serve(args) -> int:
    from memlora.serve import ServeError, serve

    try:
        return serve(host=args.host, port=args.port, pool=args.pool, deploy=not args.no_deploy)
    except ServeError as err:  # Prefect's server, pool or deploy failed: its own words, no traceback
        print(f"memlora serve: error: {err}", file=sys.stderr)
        return 1


def _api_key(args) -> str | None:
    if not args.api_key_env:
        return None
    key = os.environ.get(args.api_key_env)
    if not key:
        raise UsageError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return key


def _serve(engine, args) -> int:
    from memlora.llm.openai_server import create_app, run_server
    from memlora.serve import base_url

    print(f"serving {', '.join(engine.model_names())} at {base_url(args.host, args.port)}/v1 "
          f"(OpenAI chat completions; Ctrl-C stops)", flush=True)
    if (routing := engine.routing_line()) is not None:
        print(routing, flush=True)
    try:
        run_server(create_app(engine, _api_key(args)), args.host, args.port, engine.limits)
    finally:
        engine.close()
    return 0


def _expert_backend(config, args, grammars=None):
    """The student base with every expert of OUT (each checked against OUT's manifest), as evaluation loads it;
    `grammars`: the serving backend's compiled grammars (a reload keeps them)."""
    from memlora.evaluation.systems import EvalError, student_base
    from memlora.student.experts import ExpertBackend, verified_expert_folders

    adapters = verified_expert_folders(args.out)
    if not adapters:
        raise UsageError(f"{Path(args.out) / 'adapters'}: no trained expert (run `memlora distill` first)")
    try:
        base = args.base or student_base(config, args.out)  # where evaluation finds the student
    except EvalError as err:
        raise UsageError(f"{err}; or give --base") from None
    return ExpertBackend.from_config(config, base, adapters,
                                     prompt=config.student.prompt if config.student else "teacher", grammars=grammars)


def _fallback(config, args):
    """`--fallback URL`: the teacher unsure experts defer to, with the thresholds `memlora calibrate` wrote."""
    if not args.fallback:
        return None
    from memlora.evaluation.calibration import DeferralPolicy
    from memlora.layout import deferral_path
    from memlora.llm.fallback import Fallback
    from memlora.teacher.capture import CaptureRecorder

    policy = DeferralPolicy.read(deferral_path(args.out))
    key = os.environ.get(args.fallback_key_env) if args.fallback_key_env else None
    fallback = Fallback(args.fallback, args.fallback_model or config.teacher.model, policy,
                        CaptureRecorder.from_config(args.out, config.capture), config.deferral, api_key=key,
                        logprobs_top_k=config.capture.logprobs_top_k)
    if args.fallback_degraded:
        try:
            fallback.check_reachable()
        except Exception as err:  # noqa: BLE001  (FallbackError: started degraded, by request)
            print(f"warning: {err}; serving anyway (--fallback-degraded): deferred calls get the expert's answer "
                  "until the teacher answers", file=sys.stderr, flush=True)
    else:
        fallback.check_reachable()
    return fallback


def _guard(config, args):
    """`--guard`: no teacher; the calibrated thresholds demote unsure destructive answers."""
    if not args.guard:
        return None
    if args.fallback:
        raise UsageError("--guard and --fallback: choose one (with a teacher, unsure answers go to it)")
    from memlora.evaluation.calibration import DeferralPolicy
    from memlora.layout import deferral_path
    from memlora.llm.guard import Guard

    return Guard(DeferralPolicy.read(deferral_path(args.out)), config.deferral)


def cmd_serve_experts(args) -> int:
    from memlora.config import load_config
    from memlora.layout import deferral_path
    from memlora.llm.openai_server import ServingEngine, expert_models
    from memlora.llm.reload import ExpertsLoader, Reloader, experts_version

    config = load_config(args.config)
    # before the experts load: missing thresholds or a teacher that is down are a clear error at once
    fallback = _guard(config, args) or _fallback(config, args)
    backend = _expert_backend(config, args)
    engine = ServingEngine(backend, expert_models(backend.operations), config.capture.rules,
                           default_max_tokens=args.max_tokens, limits=config.serving, fallback=fallback)
    if config.serving.reload_s:
        def experts() -> dict:
            fresh = _expert_backend(config, args, engine.backend.grammars)
            return {"backend": fresh, "models": expert_models(fresh.operations)}

        def policy():
            from memlora.evaluation.calibration import DeferralPolicy

            return DeferralPolicy.read(deferral_path(args.out)) if engine.fallback is not None else None

        watched = [deferral_path(args.out)] if engine.fallback is not None else []
        loader = ExpertsLoader(args.out, experts, policy)
        engine.reloader = Reloader(lambda: experts_version(args.out, watched), loader, engine.swap,
                                   config.serving.reload_s)
    return _serve(engine, args)


def cmd_calibrate(args) -> int:
    import json

    from memlora.config import load_config
    from memlora.data.io import write_json
    from memlora.evaluation import deferral
    from memlora.layout import deferral_path

    config = load_config(args.config)
    backend = _expert_backend(config, args)
    operations = list(backend.operations)
    say = lambda line: print(line, flush=True)  # noqa: E731
    if args.thresholds_from:  # check another run's thresholds on this OUT's test calls (e.g. another corpus)
        if not deferral_path(args.thresholds_from).is_file():
            raise UsageError(f"--thresholds-from {args.thresholds_from}: no deferral.json (run calibrate there)")
        result = json.loads(deferral_path(args.thresholds_from).read_text())
        result.update(thresholds_from=str(args.thresholds_from), validation={},
                      test=deferral.test_check(config, args.out, backend, result["operations"], operations, say))
        path = write_json(result, deferral_path(args.out))
    else:
        result = deferral.calibrate_out(config, args.out, backend, operations,
                                        deferral.calibration_calls(args.out, config, operations), say)
        path = deferral_path(args.out)
    print(deferral.summary(result))
    print(f"wrote {path}")
    return 0


def cmd_templates(args) -> int:
    from transformers import AutoTokenizer

    from memlora.config import load_config
    from memlora.layout import student_dir
    from memlora.memory.prompts import STUDENT_SYSTEM
    from memlora.models import resolve
    from memlora.student.templates import ensure_templates, report

    check_out(args)
    if not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: no such folder (an OUT that `memlora capture` recorded into)")
    config = load_config(args.config)
    mined = ensure_templates(config, args.out, remine=args.remine, strict=True,
                             on_line=lambda line: print(line, flush=True))
    if not mined:
        print(f"{args.out}: no captured calls with a client template (capture a client's calls first; our own "
              "memory system's prompts are cut by student.prompt: minimal without one)")
        return 0
    if (student_dir(args.out) / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(student_dir(args.out)))
    else:
        ref = resolve(config.teacher.tokenizer or config.teacher.model)
        tokenizer = AutoTokenizer.from_pretrained(ref.path, **ref.pretrained_kwargs())
    for r in report(config, args.out, tokenizer, STUDENT_SYSTEM.get):
        t = r.template
        print(f"{r.operation}: template {t.fingerprint} (version {r.versions}, mined {t.mined_at} from {t.calls} "
              f"calls, {t.fixed_lines} fixed lines); {r.matching}/{r.calls} captured calls match")
        if r.matching:
            print(f"  tokens per call: {r.whole_tokens:.0f} as the client sends it, {r.reduced_tokens:.0f} read by "
                  f"the expert ({r.reduced_tokens / r.whole_tokens:.2f}x)")
            print("  what changes in the first call:\n    " + r.example[:600].replace("\n", "\n    "))
        if r.matching < r.calls:
            print(f"  WARNING {r.calls - r.matching} calls do not match: the client's prompt changed (a new "
                  "release?); they are not trained on. `--remine` makes a new template from every call")
    return 0


def cmd_serve_model(args) -> int:
    from memlora.config import load_config
    from memlora.llm.hf_backend import TransformersBackend
    from memlora.llm.openai_server import MODEL, ServedModel, ServingEngine

    config = load_config(args.config)
    llm = config.teacher.model_copy(update={"logprobs_top_k": 0, **({"model": args.model} if args.model else {})})
    if llm.backend != "transformers":
        raise UsageError(f"{args.config}: teacher.backend {llm.backend!r} is already a server; serve-model loads "
                         "a local model (give --model)")
    engine = ServingEngine(TransformersBackend.from_config(llm), [ServedModel(args.name or llm.model, MODEL)],
                           config.capture.rules, default_max_tokens=args.max_tokens, limits=config.serving)
    return _serve(engine, args)


def cmd_capture(args) -> int:
    from memlora.config import load_config
    from memlora.llm.openai_protocol import unreachable
    from memlora.llm.openai_server import run_server
    from memlora.serve import base_url
    from memlora.teacher.capture import CaptureRecorder, create_capture_app

    config = load_config(args.config)
    if not config.capture.rules:
        raise UsageError(f"{args.config}: capture.rules is empty: no call would be recorded")
    recorder = CaptureRecorder.from_config(args.out, config.capture)
    upstream_key = os.environ.get(args.upstream_key_env) if args.upstream_key_env else None
    app = create_capture_app(args.upstream, config.capture, recorder, upstream_key=upstream_key,
                             limits=config.serving)
    problem = unreachable(args.upstream, {"Authorization": f"Bearer {upstream_key}"} if upstream_key else None, 5)
    if problem:  # a proxy may start before its teacher; it says so, and each call meanwhile is the client's 502
        print(f"warning: --upstream {args.upstream}: {problem}; calls answer 502 until it is up", file=sys.stderr,
              flush=True)
    print(f"capturing at {base_url(args.host, args.port)}/v1 -> {args.upstream}; traces under "
          f"{Path(args.out) / 'traces'} (Ctrl-C stops)", flush=True)
    run_server(app, args.host, args.port, config.serving)
    print(f"capture: {dict(sorted(recorder.counts.items()))}", flush=True)
    return 0


def cmd_run(args) -> int:
    from memlora.data.split import require_test_conversation

    require_test_conversation(check_data(args), args.data)
    from memlora.flows.pipeline import pipeline

    summary = pipeline(config_path=args.config, data=args.data, out=args.out)
    out = Path(args.out)
    print(f"pipeline finished: manifest at {manifest_path(out)}, release under {releases_root(out)}")
    report = report_path(out)
    if report.is_file():
        print(f"report: {report}")
    print("headline (test conversations; 95 % intervals and n in the report):")
    print(headline_text(summary["evaluate"]["headline"]))
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memlora")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has one (not for required options or `None`)."""

    def _get_help_string(self, action):
        if action.default is None or action.required or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


COMMANDS = {
    "ingest": ("validate input conversations into OUT/datasets",
        "Validate the input conversations (LoCoMo JSON, JSONL or a Parquet folder) and write them, split into "
        "train / validation / test, as OUT/datasets/*.parquet. A bad file is named with its row and field."),
    "traces": ("record the teacher's memory-operation calls as Parquet traces",
        "Run the teacher through the memory system over the train and validation conversations and record "
        "every extraction, update and generation call as OUT/traces/<operation>/part-*.parquet (runs "
        "ingest first; resumes after an interruption)."),
    "distill": ("train one expert adapter per operation on the student",
        "Train one expert adapter per operation on the student from OUT/traces, through the DeepSpeed "
        "launcher; experts already trained on the same traces with the same recipe are kept, and so, where OUT "
        "serves through the loop (deferral.json), are experts whose only new traces are calls served since: those "
        "go through `memlora improve`'s gate."),
    "export": ("write the experts as plain LoRA adapters",
        "Write the experts as plain LoRA adapters (OUT/export/lora/<operation>/) that peft or a multi-LoRA "
        "server loads without memlora."),
    "evaluate": ("teacher vs bare student vs student + experts on the test conversations",
        "Replay the test conversations with the teacher, the bare student and the student + experts; "
        "write OUT/eval/results.parquet, report.md and report.png."),
    "verify": ("check a release (or OUT) against its manifest",
        "Check a dataset release (or OUT) against its manifest: sizes and sha256 of every file."),
    "release": ("publish OUT's datasets as a versioned release",
        "Publish OUT's Parquet datasets as a versioned, checksummed release under OUT/releases/ (the "
        "pipeline's last step; an OUT of captured calls is released without --data). Where OUT's files are "
        "those of the latest release, nothing new is published."),
    "serve": ("local Prefect server + worker with the scheduled deployments",
        "Start a local Prefect server and a process worker with the deployments of prefect.yaml (the "
        "nightly schedule included); Ctrl-C stops both."),
    "serve-experts": ("serve the student + experts over the OpenAI API",
        "Serve the student base with every expert of OUT (manifest-checked) as an OpenAI-compatible endpoint: "
        "model memlora-<operation> picks the expert, memlora-base the bare student."),
    "improve": ("train candidates on new traces, promote the better ones (the nightly loop)",
        "Train candidate experts on the trace rows that arrived since the served experts were trained "
        "(captured and deferred calls), compare them with the served experts on held-out calls, and promote per "
        "operation those not worse beyond improve.margin and better on agreement or calls kept; the served set "
        "is kept as a version first, and deferral is recalibrated."),
    "compact": ("merge the captured calls' single-call trace shards",
        "Merge each operation's captured single-call shards (OUT/traces/<operation>/part-capture-*.parquet, one "
        "per recorded call) into files of up to --max-rows rows. Nothing downstream changes: the experts' cache "
        "keys and improve's new rows are taken over the calls the files hold. The merged shards are removed at once: "
        "not while another command reads OUT's traces (`improve` does it first by itself, capture.compact_at, "
        "and leaves them for its next run)."),
    "rollback": ("serve an earlier version of the experts again",
        "Serve an earlier version of the experts (OUT/versions/<id>, checked against its version.json) again; "
        "without --to, list the versions."),
    "calibrate": ("deferral thresholds per expert for serve-experts --fallback",
        "Answer the validation split's calls with each expert, read each answer's confidence from its token "
        "log-probs, and write OUT/deferral.json: per operation, the threshold that keeps the most calls with "
        "the kept answers' disagreement with the teacher within deferral.budget (upper 95 % bound); checked "
        "on the test conversations' teacher calls where an evaluation has run."),
    "templates": ("find and show the fixed part of a captured client's prompts",
        "Mine, per operation, the lines every captured call of a client shares (its instructions and examples) "
        "into OUT/templates/<operation>.json, once (--remine: a new version), and show them: an expert with "
        "student.prompt minimal reads only what changes. Shows how many calls match and their tokens whole vs "
        "reduced."),
    "serve-model": ("serve one model (e.g. the teacher) over the OpenAI API",
        "Serve the config's teacher (or --model) as an OpenAI-compatible endpoint, with the same decoding, "
        "schemas and batching as serve-experts."),
    "capture": ("record a memory system's calls to its teacher as traces",
        "An OpenAI-compatible proxy in front of a teacher endpoint: forwards every call and records those the "
        "config's capture.rules match as trace rows under OUT/traces/<operation>/ (what distill trains on)."),
    "run": ("the whole pipeline (what `make run` calls)",
        "The whole pipeline: ingest, traces, distill, evaluate, release (what `make run` calls)."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlora", description="Distil a large LLM's memory operations into "
                                     "small expert adapters: traces -> distill -> evaluate -> release.")
    parser.add_argument("--version", action="version", version=f"memlora {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str):
        short, summary = COMMANDS[name]
        return sub.add_parser(name, help=short, description=summary,
                              formatter_class=_HelpFormatter)

    def config(p) -> None:
        p.add_argument("--config", default=DEFAULT_CONFIG, help="run config (YAML); see configs/default.yaml")

    def out(p, required: bool = True) -> None:
        p.add_argument("--out", required=required, default=None if required else "out",
                       help="output folder holding datasets, traces, adapters, eval and releases")

    data_help = ("input conversations: LoCoMo JSON, memlora JSONL or a folder of conversations.parquet + "
                 "questions.parquet")

    p = command("ingest")
    p.add_argument("--data", required=True, help=data_help)
    out(p)
    config(p)  # its `data` section: the same split as `memlora traces` and `memlora run` with the same config
    p.set_defaults(func=cmd_ingest)

    p = command("traces")
    config(p)
    p.add_argument("--data", required=True, help=data_help)
    out(p)
    p.set_defaults(func=cmd_traces)

    p = command("distill")
    config(p)
    out(p)
    p.set_defaults(func=cmd_distill)

    p = command("export")
    out(p)
    p.add_argument("--format", choices=["lora"], default="lora", help="adapter format")
    p.add_argument("--base", default=None,
                   help="student base (default: OUT/student/base, else the base the experts were trained on)")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default: the expert's own)")
    p.set_defaults(func=cmd_export)

    p = command("evaluate")
    config(p)
    out(p)
    p.add_argument("--data", default=None,
                   help="evaluate on this corpus's conversations instead (all of them test; LoCoMo JSON, JSONL or "
                        "Parquet folder); OUT is then a new folder, and --experts-from names the trained run")
    p.add_argument("--experts-from", default=None, metavar="TRAINED_OUT",
                   help="with --data: the OUT whose student base and trained experts are evaluated")
    p.add_argument("--sessions", type=positive_int, default=None, metavar="N",
                   help="with --data: each conversation's first N sessions, and only the questions about them")
    p.set_defaults(func=cmd_evaluate)

    p = command("verify")
    p.add_argument("path", help="a release folder (OUT/releases/<name>/<version>, or its `latest` link) or OUT")
    p.set_defaults(func=cmd_verify)

    p = command("release")
    config(p)
    p.add_argument("--data", default=None, help="the source data the datasets were made from (fingerprinted); "
                   "none for an OUT of captured calls, which are their own source")
    out(p)
    p.add_argument("--name", default=None, help="dataset name (default: <config name>-traces)")
    p.set_defaults(func=cmd_release)

    p = command("serve")
    p.add_argument("--host", default="127.0.0.1", help="address the Prefect API and UI bind to")
    p.add_argument("--port", type=port_number, default=4200, help="Prefect API and UI port")
    p.add_argument("--pool", default="memlora-pool", help="process work pool the worker serves")
    p.add_argument("--no-deploy", action="store_true", help="do not (re)deploy prefect.yaml's deployments")
    p.set_defaults(func=cmd_serve)

    def server(p, port: int) -> None:
        p.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback exposes it)")
        p.add_argument("--port", type=port_number, default=port, help="port")

    def api(p) -> None:
        p.add_argument("--api-key-env", default=None,
                       help="environment variable holding a bearer key clients must send (default: no key)")
        p.add_argument("--max-tokens", type=positive_int, default=512,
                       help="completion cap when a request gives none")

    p = command("serve-experts")
    config(p)
    out(p)
    p.add_argument("--base", default=None, help="student base (default: OUT/student/base, else student.model)")
    server(p, 8100)
    api(p)
    p.add_argument("--fallback", default=None, type=http_url, help="an OpenAI-compatible teacher endpoint (e.g. "
                   "http://127.0.0.1:8000/v1): calls an expert is unsure of go there (thresholds from "
                   "`memlora calibrate`)")
    p.add_argument("--fallback-model", default=None, help="the model name the fallback serves (default: the "
                   "config's teacher.model, what serve-model names it)")
    p.add_argument("--fallback-key-env", default=None, help="environment variable with the fallback's key")
    p.add_argument("--fallback-degraded", action="store_true", help="start even if the fallback is unreachable "
                   "(deferred calls get the expert's answer, counted, until it answers)")
    p.add_argument("--guard", action="store_true", help="no teacher behind the experts: an update answer that "
                   "deletes or rewrites a memory below its calibrated threshold is demoted (DELETE -> NONE, UPDATE "
                   "-> ADD beside the old memory); other unsure answers are marked in the response (thresholds "
                   "from `memlora calibrate`)")
    p.set_defaults(func=cmd_serve_experts)

    p = command("improve")
    config(p)
    out(p)
    p.set_defaults(func=cmd_improve)

    p = command("compact")
    out(p)
    p.add_argument("--min-shards", type=positive_int, default=2, help="merge an operation's shards only once "
                   "there are this many (default: 2)")
    p.add_argument("--max-rows", type=positive_int, default=50_000, help="rows per merged file (default: 50000)")
    p.set_defaults(func=cmd_compact)

    p = command("rollback")
    out(p)
    p.add_argument("--to", default=None, metavar="VERSION", help="the version to serve (default: list them)")
    p.set_defaults(func=cmd_rollback)

    p = command("calibrate")
    config(p)
    out(p)
    p.add_argument("--base", default=None, help="student base (default: OUT/student/base, else student.model)")
    p.add_argument("--thresholds-from", default=None, metavar="OUT2", help="check OUT2's thresholds on OUT's "
                   "test calls instead of calibrating (e.g. OUT from `memlora evaluate --data ... --experts-from "
                   "OUT2`)")
    p.set_defaults(func=cmd_calibrate)

    p = command("templates")
    config(p)
    out(p)
    p.add_argument("--remine", action="store_true", help="mine a new template version from every captured call")
    p.set_defaults(func=cmd_templates)

    p = command("serve-model")
    config(p)
    p.add_argument("--model", default=None, help="model to serve (default: the config's teacher.model)")
    p.add_argument("--name", default=None, help="the name clients request it by (default: the model reference)")
    server(p, 8000)
    api(p)
    p.set_defaults(func=cmd_serve_model)

    p = command("capture")
    config(p)
    out(p)
    p.add_argument("--upstream", required=True, type=http_url,
                   help="the teacher's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--upstream-key-env", default=None,
                   help="environment variable with the upstream's key (default: the client's own header)")
    server(p, 8200)
    p.set_defaults(func=cmd_capture)

    p = command("run")
    config(p)
    p.add_argument("--data", default=DEFAULT_DATA, help=data_help)
    out(p, required=False)
    p.set_defaults(func=cmd_run)
    return parser


SERVERS = ("serve", "serve-experts", "serve-model", "capture")  # they stop themselves on a signal


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("config", DEFAULT_CONFIG), ("data", DEFAULT_DATA)):
        if getattr(args, name, None) == default:
            setattr(args, name, bundled(default))
    from contextlib import nullcontext

    from memlora.processes import exit_on_interrupt

    # serve stops its own server and worker on a signal
    guard = nullcontext() if args.command in SERVERS else exit_on_interrupt(args.command)
    try:
        with guard:
            check_out(args)
            check_address(args)
            with writing_out(args):
                return args.func(args)
    except _known_errors() as err:
        print(f"memlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: the message names the path; earlier artifacts are intact
        print(f"memlora {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
