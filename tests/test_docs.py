"""The docs cannot go stale and the code keeps its layout: generated tables match what `make docs` writes from
bench/reference/, every link between pages resolves, and the rules of the style guide hold (domain packages never
import Prefect; imports of our own modules sit at the top of their module unless a comment says why not)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
DOMAIN = ["data", "memory", "llm", "teacher", "student", "evaluation"]
CODE = ["memlora", *DOMAIN, "tasks", "flows"]

pytestmark = pytest.mark.timeout(120)


def test_generated_blocks_are_what_make_docs_writes():
    done = subprocess.run([sys.executable, str(REPO / "docs" / "generate.py"), "--check"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_names_a_block_that_was_edited_by_hand(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import generate
    finally:
        sys.path.remove(str(REPO / "docs"))
    page = tmp_path / "README.md"
    text = (REPO / "README.md").read_text()
    assert "<!-- generated: headline -->" in text
    page.write_text(text.replace("| extraction fact F1 vs teacher | 31 |", "| extraction fact F1 vs teacher | 32 |"))
    monkeypatch.setattr(generate, "REPO", tmp_path)
    monkeypatch.setattr(generate, "pages", lambda: [page])
    assert generate.stale_blocks() == ["README.md: headline"]
    generate.main([])
    assert page.read_text() == text


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_between_pages_resolves():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md":
                anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                if anchor not in anchors:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_stays_short_and_each_docs_page_says_what_it_is_for():
    assert len((REPO / "README.md").read_text().splitlines()) <= 120
    for page in (REPO / "docs").glob("*.md"):
        lines = page.read_text().splitlines()
        assert lines[0].startswith("# ") and lines[2].startswith("This page"), page.name


def _modules():
    for package in CODE:
        yield from sorted((REPO / package).glob("*.py"))


def test_domain_packages_never_import_prefect():
    offenders = []
    for package in DOMAIN:
        for path in sorted((REPO / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path.relative_to(REPO)}:{node.lineno}" for n in names if n.split(".")[0] == "prefect"]
    assert not offenders, offenders


def test_our_modules_are_imported_at_the_top_unless_a_comment_says_why():
    """Imports inside functions hid an import cycle or a slow import; the few kept name their reason just above."""
    inside = []
    for path in _modules():
        if path.name == "cli.py":  # each command imports what it needs: `memlora --help` stays fast
            continue
        source = path.read_text()
        lines = source.splitlines()
        for function in ast.walk(ast.parse(source)):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("memlora"):
                    above = "\n".join(lines[max(0, node.lineno - 4):node.lineno - 1])
                    inside.append((f"{path.relative_to(REPO)}:{node.lineno}", "#" in above))
    assert len(inside) <= 6, inside
    assert all(reason for _, reason in inside), [where for where, reason in inside if not reason]
