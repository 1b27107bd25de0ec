"""Versioned dataset releases for downstream teams, and their verification.

`OUT/releases/<name>/<version>/` holds copies of the run's Parquet files, `manifest.json` and a `README.md`
dataset card. The folder is assembled under a hidden name and renamed when complete; only then does the
`latest` symlink move (itself replaced atomically), so `latest` never points at a partial release. A run whose
files are exactly the latest release's (a nightly rerun that changed nothing) publishes nothing new: downstream
teams see a new version only when the data changed, and OUT does not gain a copy a night.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from memlora import __version__
from memlora.config import Config
from memlora.data.io import WriteError, sha256_file, swap_in
from memlora.data.schemas import SCHEMA_VERSION, VERSION_KEY
from memlora.layout import RELEASED, releases_dir
from memlora.manifest import artifact_files, describe_file, git_revision
from memlora.memory.prompts import templates

CARD = "README.md"  # a release's dataset card, beside its manifest


class VerifyError(RuntimeError):
    pass


def data_fingerprint(path: str | Path) -> str:
    """sha256 over the input file, or over a folder's files (names and contents)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + sha256_file(f).encode())
    return digest.hexdigest()


def release_files(out: Path) -> list[Path]:
    return [p for folder in RELEASED if (out / folder).is_dir()
            for p in sorted((out / folder).rglob("*.parquet")) if not p.name.startswith(".")]


def sweep_leftovers(root: Path) -> None:
    """Remove what a publisher killed mid-way left behind: hidden staging folders and link temporaries. They are
    never what `latest` points at, so nothing a reader sees goes away (one publisher per dataset at a time)."""
    if not root.is_dir():
        return
    for leftover in root.iterdir():
        if leftover.name.startswith(".staging-"):
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.name.startswith(".latest-"):
            leftover.unlink(missing_ok=True)


@dataclass(frozen=True)
class Release:
    path: Path
    new: bool  # False: OUT's files were the latest release's, which is returned as it was


def unchanged_latest(root: Path, files: dict[str, str]) -> Path | None:
    """The latest release where it holds exactly these files (path -> sha256) and still matches its manifest."""
    try:
        latest = resolve_release(root)
        listed = {f["path"]: f["sha256"] for f in json.loads((latest / "manifest.json").read_text())["files"]}
    except (VerifyError, OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or one that cannot be read: publish
    return latest if listed == files and not verify_release(latest) else None


CAPTURED = "captured calls"  # a release's source where no data file was read: what `memlora capture` recorded


def source_of(data: str | Path | None) -> dict:
    """What the release was made from: a data file or folder, fingerprinted; or (no data) the calls a client's
    memory system made through `memlora capture` and a deferring server, which are themselves in the release."""
    if data is None:
        return {"path": None, "sha256": None, "kind": CAPTURED}
    return {"path": str(data), "sha256": data_fingerprint(data), "kind": "conversations"}


def publish_release(out: str | Path, config: Config, data: str | Path | None, name: str | None = None) -> Release:
    """`data`: the conversations OUT's datasets and traces were made from; None for an OUT of captured calls."""
    out = Path(out)
    files = release_files(out)
    if not files:
        raise FileNotFoundError(f"{out}: no Parquet datasets to release")
    name = name or f"{config.name}-traces"
    digests = {f.relative_to(out).as_posix(): sha256_file(f) for f in files}
    root = releases_dir(out, name)
    sweep_leftovers(root)
    same = unchanged_latest(root, digests)
    if same is not None:
        return Release(same, new=False)
    content = hashlib.sha256("".join(digests.values()).encode()).hexdigest()[:10]
    created = datetime.now(timezone.utc)
    version = f"{created:%Y%m%dT%H%M%SZ}-{content}"
    final, n = root / version, 1
    while final.exists():  # same content published twice within a second
        n += 1
        final = root / f"{version}.{n}"
    version = final.name
    staging = root / f".staging-{version}"
    try:
        staging.mkdir(parents=True)
        for f in files:
            target = staging / f.relative_to(out)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        manifest = {
            "name": name,
            "version": version,
            "created_at": created.isoformat(timespec="seconds"),
            "schema_version": SCHEMA_VERSION,
            "memlora_version": __version__,
            "code_revision": git_revision(),
            "teacher_model": config.teacher.model,
            "student_model": (config.student.model or f"pruned teacher {config.student.prune.model_dump(by_alias=True)}")
            if config.student else None,
            "prompt_template_hashes": {op: t.hash for op, t in templates(config.memory.update_output).items()},
            "source_data": source_of(data),
            "config": config.model_dump(mode="json", by_alias=True),
            "files": [describe_file(p, staging) for p in sorted(staging.rglob("*.parquet"))],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (staging / CARD).write_text(dataset_card(manifest))
        swap_in(staging, final)  # `final` is new: a plain rename, after the files are synced
    except OSError as err:
        raise WriteError.of(err, f"{final}: release not published ({err}); `latest` still points at the "
                                    "previous release") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    link = root / "latest"
    tmp_link = root / f".latest-{version}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version)
    os.replace(tmp_link, link)  # atomic: readers see the old release or the new one, never neither
    return Release(final, new=True)


COLUMN_NOTES = {
    "conversations": "one row per conversation turn: conversation_id, split (train/validation/test), session, turn, dia_id, "
    "speaker, text, time (session start), image_caption (caption of a shared image, if any)",
    "questions": "one row per question: conversation_id, split, question_id, question, answer (gold; null for "
    "adversarial questions), adversarial_answer (the trap answer of category 5), category (1 multi-hop, "
    "2 temporal, 3 open-domain, 4 single-hop, 5 adversarial), evidence (dia_ids)",
    "traces": "one row per teacher call: trace_id, operation, conversation_id, session, step, messages "
    "(the exact chat prompt), output_schema (JSON schema decoding was constrained to, or null), raw_output, "
    "parsed_output (JSON), parse_ok, parse_error, constrained, finish_reason, prompt_tokens, completion_tokens, "
    "completion_token_ids, top_logprobs (teacher's top-k per completion token), latency_s, batch_size, model_id, "
    "backend, template_hash",
    "eval": "the evaluation of the test conversations. `eval/results.parquet`: one row per (system, section, "
    "operation, metric) with value, n, 95% CI (ci_low, ci_high, ci_method), unit and decoding; "
    "`eval/systems/<system>/calls.parquet`: every call each system (teacher, student, student-experts) made, "
    "end-to-end and teacher-forced, with its raw and parsed output, parse_ok, schema_valid, finish_reason, tokens "
    "and latency; `eval/systems/<system>/qa.parquet`: each gold question with the system's answer and the memories "
    "it answered from; `eval/systems/judge/judgements.parquet`: the LLM judge's label per answer (by default the "
    "teacher judges itself: not an independent measure)",
}


def dataset_card(manifest: dict) -> str:
    rows = "\n".join(f"| `{f['path']}` | {f.get('rows', '')} | `{f['sha256'][:16]}…` |" for f in manifest["files"])
    paths = [f["path"] for f in manifest["files"]]
    prefix = {"conversations": "datasets/conversations", "questions": "datasets/questions", "traces": "traces/",
              "eval": "eval/"}
    columns = "\n".join(f"- **{kind}**: {note}" for kind, note in COLUMN_NOTES.items()
                        if any(p.startswith(prefix[kind]) for p in paths))
    first = next((f["path"] for f in manifest["files"] if f["path"].startswith("traces/")), manifest["files"][0]["path"])
    holds, made = provenance(manifest)
    return f"""# {manifest['name']} — release {manifest['version']}

{holds}, produced by memlora {manifest['memlora_version']}
(code revision `{manifest['code_revision']}`) on {manifest['created_at']}.

## How it was made

{made} The full config is in `manifest.json`. Rows with `parse_ok = false` are kept raw and were
not used for training.

## Files (schema version {manifest['schema_version']}, in each file's metadata as `memlora.schema_version`)

| file | rows | sha256 |
|---|---|---|
{rows}

## Columns

{columns}

## Loading

```python
import pyarrow.parquet as pq
table = pq.read_table("{first}")

from datasets import load_dataset
ds = load_dataset("parquet", data_files={{"train": "traces/extraction/*.parquet"}}, split="train")
```

Check a copy against this manifest with `memlora verify <release folder>`.
"""


def provenance(manifest: dict) -> tuple[str, str]:
    """The card's opening (what the release holds) and its "how it was made", by the release's source."""
    source = manifest["source_data"]
    if source.get("kind") == CAPTURED:
        return ("Teacher traces of a client's memory system (its calls to its teacher, per operation)",
                "The calls a client's memory system made to its teacher, recorded by `memlora capture` (and the calls "
                "a deferring `memlora serve-experts` handed to the teacher), each one trace row as the client sent it, "
                "with the teacher's answer. They hold the client's users' text: share them only where that is "
                "allowed.")
    return ("Teacher traces of a Mem0-style memory system (operations: extraction, update, generation) and the "
            "normalized conversations and questions they were made from",
            f"The teacher `{manifest['teacher_model']}` replayed each train conversation session by session through "
            "the memory system; every model call is one trace row. Prompt template hashes: "
            f"{manifest['prompt_template_hashes']}. Source data: `{source['path']}` (sha256 "
            f"`{source['sha256'][:16]}…`).")


def resolve_release(path: str | Path) -> Path:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    if (path / "latest" / "manifest.json").is_file():
        return (path / "latest").resolve()
    raise VerifyError(f"{path}: no manifest.json here (give a release folder, or a dataset folder with `latest`)")


def _covered_files(folder: Path, manifest: dict) -> list[Path]:
    """The files a manifest vouches for, listed or not: every file of a release but its manifest and card; for an
    OUT, every file under the folders its manifest tracks (OUT's releases carry manifests of their own)."""
    if "version" in manifest:  # a release
        return [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("manifest.json", CARD)]
    return artifact_files(folder)


def verify_release(path: str | Path) -> list[str]:
    """Every difference between the release folder and its manifest; empty when it matches."""
    release = resolve_release(path)
    try:
        manifest = json.loads((release / "manifest.json").read_text())
    except json.JSONDecodeError as err:
        return [f"{release / 'manifest.json'}: not valid JSON ({err})"]
    problems = []
    listed = set()
    for entry in manifest.get("files", []):
        rel = entry["path"]
        listed.add(rel)
        f = release / rel
        if not f.is_file():
            problems.append(f"{rel}: missing")
            continue
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            problems.append(f"{rel}: sha256 {digest[:16]}… differs from the manifest's {entry['sha256'][:16]}…")
            continue
        if f.suffix == ".parquet":
            meta = pq.read_metadata(f)
            version = ((meta.schema.to_arrow_schema().metadata or {}).get(VERSION_KEY) or b"").decode()
            if version != entry.get("schema_version"):
                problems.append(f"{rel}: schema version {version!r}, manifest says {entry.get('schema_version')!r}")
            if meta.num_rows != entry.get("rows"):
                problems.append(f"{rel}: {meta.num_rows} rows, manifest says {entry.get('rows')}")
    for f in _covered_files(release, manifest):
        rel = f.relative_to(release).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: present but not in the manifest")
    if manifest.get("schema_version") not in (None, SCHEMA_VERSION):
        problems.append(f"manifest schema version {manifest['schema_version']!r}; this memlora reads {SCHEMA_VERSION!r}")
    return problems
