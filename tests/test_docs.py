"""README.md is the front page and the details live in docs/*.md: README stays short, and every
relative link and image in README.md and docs/*.md points to a file that exists and, with a
#anchor, to a heading of that file (GitHub's slugs). External http(s) links are not checked."""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
README_MAX_LINES = 300

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title"
_MD_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+\"[^\"]*\")?\s*\)")
_IMG_SRC = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def _prose_lines(text):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading):
    """GitHub's anchor for a heading text: markup and punctuation other than '-' and '_'
    dropped, lowercase, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)                          # inline HTML tags
    text = text.lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path):
    """Every anchor of a markdown file; repeated headings get -1, -2, ... as on GitHub."""
    seen, result = {}, set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path):
    """(line number, target) of every markdown link, image and <img src> outside code."""
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = _CODE_SPAN.sub("", line)
        for match in _MD_LINK.finditer(line):
            yield number, match.group(1).strip("<>")
        for match in _IMG_SRC.finditer(line):
            yield number, match.group(1)


def broken_links(path):
    """One message per relative link of `path` whose file or #anchor does not exist."""
    problems = []
    for number, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.name}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: no file {os.path.relpath(linked, path.parent)}")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked)):
            problems.append(f"{where}: no heading #{anchor} in {linked.name}")
    return problems


def test_readme_is_short():
    count = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert count <= README_MAX_LINES, f"README.md has {count} lines (at most {README_MAX_LINES})"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert broken_links(page) == []


def test_readme_links_every_page():
    """README's contents name every page of docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = {target.partition("#")[0] for _, target in links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in targets, f"README.md does not link docs/{page.name}"
    assert "## Contents" in readme


def test_slugs_follow_github():
    assert slug("Normalization library (`normalization/`)") == "normalization-library-normalization"
    assert slug("The paper's tools (`tools/`, `analysis/`)") == "the-papers-tools-tools-analysis"
    assert slug("Batch settings and virtual GPUs") == "batch-settings-and-virtual-gpus"
    assert slug("Sparse SN: hard ratios (`tools/sparsify.py`)") == "sparse-sn-hard-ratios-toolssparsifypy"
    assert slug("snake_case and a-dash") == "snake_case-and-a-dash"


def test_checker_finds_broken_links_and_anchors(tmp_path):
    """The checker is not vacuous: each kind of broken link in a small page is reported, and
    the good links, code blocks, code spans and external links are not."""
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "other.md").write_text("# Other page\n\n## Usage\n\n## Usage\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n"
        "## Set-up (`make`)\n\n"
        "[ok](other.md) [ok](other.md#usage) [ok](other.md#usage-1) [ok](#set-up-make)\n"
        "![ok](figures/a.png) <img src=\"figures/a.png\" width=\"10\"> [ok](https://x.invalid/y)\n"
        "`[not a link](missing.md)`\n\n"
        "```python\n[not a link](missing.md)\n# not a heading\n```\n\n"
        "[bad file](nowhere.md) [bad anchor](other.md#usage-2) [bad here](#not-a-heading)\n"
        "<img src=\"figures/b.png\"> ![bad image](figures/c.png) [bad](#title-1)\n")
    problems = broken_links(page)
    assert [p.split(": ", 2)[1] for p in problems] == [
        "nowhere.md", "other.md#usage-2", "#not-a-heading", "figures/c.png", "#title-1",
        "figures/b.png"]
    assert all(p.startswith(("page.md:14: ", "page.md:15: ")) for p in problems)
    assert anchors(page) == {"title", "set-up-make"}
