"""The documentation: the site builds in strict mode, the README stays short, every relative link
resolves (anchors included), and no doc repeats a claim the code no longer makes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.glob("*.md"))
# claims the code no longer makes: it batches rows of many tasks together (no @serve.multiplexed),
# and the transform path has served requests for a long time
STALE = ("multiplexed adapters", "(later) serving")
OUTSIDE = ("ARCHITECTURE.md", "STYLE.md", "../shared", "/work/shared")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """The anchor of a heading, as MkDocs' toc and GitHub both make it for plain headings."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", path.read_text(), flags=re.M | re.S)
    return {slug(m.group(2)) for m in map(HEADING.match, text.splitlines()) if m}


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_mkdocs_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_nav_lists_every_page():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert cfg["theme"]["name"] == "material"

    def files(node):
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [f for item in node for f in files(item)]
        return [f for v in node.values() for f in files(v)]

    assert sorted(files(cfg["nav"])) == sorted(p.name for p in PAGES)
    for page in ("index", "train", "sweep", "registry", "serve", "multitenant", "batch-predict", "safety",
                 "methods", "tasks", "backbone", "benchmarks", "architecture"):
        assert (DOCS / f"{page}.md").exists(), page


def test_readme_is_short_and_maps_the_docs():
    text = README.read_text()
    assert len(text.encode()) <= 15_000, f"README.md is {len(text.encode())} bytes; move detail to docs/"
    for page in PAGES:
        assert f"docs/{page.name}" in text, f"README.md does not link docs/{page.name}"


@pytest.mark.parametrize("path", [README, *PAGES], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.name}: {broken}"


def test_no_stale_claims_and_nothing_outside_the_repo():
    for path in [README, *PAGES, ROOT / "mkdocs.yml"]:
        text = path.read_text()
        for phrase in STALE:
            assert phrase.lower() not in text.lower(), f"{path.name}: stale claim {phrase!r}"
        for ref in OUTSIDE:
            assert ref not in text, f"{path.name} refers to {ref}, outside the repository"
    for folder in ("platform", "serve_apps", "jobs", "bench", "infra"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".yaml", ".yml", ".toml") and path.is_file():
                text = path.read_text(errors="replace")
                assert not any(ref in text for ref in OUTSIDE[:2]), f"{path.relative_to(ROOT)} cites a doc outside the repo"
