"""The README leads: short up to its results, and every relative link in it and in the guides resolves."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_LINES_BEFORE_RESULTS = 150
DOCS = sorted(
    [ROOT / "README.md", *(ROOT / "docs" / "guide").glob("*.md"), *(ROOT / "docs" / "results").rglob("README.md")]
)

INLINE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+(\S+)", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6}\s+(.+)$", prose(path.read_text(encoding="utf-8")), re.M)}


def broken_links(path: Path) -> list[str]:
    """Relative links of a Markdown file whose file (or heading anchor) does not exist."""
    text = prose(path.read_text(encoding="utf-8"))
    broken = []
    for target in INLINE.findall(text) + REFERENCE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_readme_leads_with_at_most_150_lines_before_results():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert "## Results" in lines, "README.md has no '## Results' section"
    before = lines.index("## Results")
    assert before <= README_LINES_BEFORE_RESULTS, (
        f"README.md has {before} lines before '## Results' (at most {README_LINES_BEFORE_RESULTS}): "
        "move details to docs/guide/"
    )


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)}: broken links"


def test_the_link_check_finds_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[ok](there.md) [ok](there.md#a-heading) [web](https://example.org/x) `[code](nowhere.md)`\n"
        "[gone](missing.md) [bad anchor](there.md#nope)\n[ref]: also-missing.png\n"
        "```\n[in code](nowhere.md)\n```\n"
    )
    assert broken_links(doc) == [
        "missing.md (no such file)",
        "there.md#nope (no heading #nope in there.md)",
        "also-missing.png (no such file)",
    ]
