"""Docs that cannot drift from the tree.

- every module under ``dpm_dist/`` has its line in the package layout of docs/architecture.md, and the layout
  names no module that is gone;
- every module of a subpackage is named (````name````) in its package's ``__init__.py`` docstring, which says
  what each owns;
- every relative Markdown link (README.md, CONTRIBUTING.md, CHANGELOG.md, docs/, shards/README.md...) points at
  a file or folder that exists.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dpm_dist"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
# not the repository's own docs: environments, caches, build output, shard data, run folders
SKIP_DIRS = {".git", ".venv", "build", "runs", "outputs", "multirun", "node_modules", "dpm_dist.egg-info"}


def modules() -> set[str]:
    """``cli/train.py``-style paths of every module of the package (``__init__.py`` of subpackages aside)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if not (path.name == "__init__.py" and "/" in rel):
            found.add(rel)
    return found


def layout_block() -> str:
    """The first fenced block after the ``## Package layout`` heading of docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    section = text.split("## Package layout", 1)[1]
    return section.split("```", 2)[1]


def layout_modules(block: str) -> set[str]:
    """``dpm_dist/`` tree lines -> module paths: ``  data/`` opens a package, the ``name.py`` words before the
    description (``export.py, embed.py, search.py   ...`` names three) are its modules."""
    found, package = set(), ""
    for line in block.splitlines():
        stripped = line.strip()
        if not stripped or stripped == "dpm_dist/":
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        names = re.split(r"\s{2,}", stripped, maxsplit=1)[0]
        if depth == 1:
            package = names[:-1] + "/" if names.endswith("/") else ""
            if package:
                continue
        for name in re.findall(r"([\w]+\.py)\b", names):
            found.add(package + name if depth > 1 else name)
    return found


def test_the_layout_parser_reads_the_tree_notation():
    block = "\ndpm_dist/\n  config.py   schema\n  cli/\n    train.py   dpm-train (a.py)\n    x.py, y.py   two\n  z.py  top\n"
    assert layout_modules(block) == {"config.py", "cli/train.py", "cli/x.py", "cli/y.py", "z.py"}


def test_every_module_is_in_the_architecture_layout():
    listed, present = layout_modules(layout_block()), modules()
    missing, gone = sorted(present - listed), sorted(listed - present)
    assert not missing, f"docs/architecture.md's package layout lacks {missing}: one line each, name + what it owns"
    assert not gone, f"docs/architecture.md's package layout names modules that do not exist: {gone}"


@pytest.mark.parametrize("package", sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()))
def test_every_module_is_named_in_its_package_docstring(package):
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text())) or ""
    named = set(re.findall(r"``(\w+)``", doc))
    stems = sorted(p.stem for p in (PACKAGE / package).glob("*.py") if p.name != "__init__.py")
    missing = [s for s in stems if s not in named]
    assert not missing, f"dpm_dist/{package}/__init__.py's docstring does not name {missing} (``name``: what it owns)"


def markdown_files() -> list[Path]:
    found = []
    for path in ROOT.rglob("*.md"):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        if parts[0] == "shards" and parts != ("shards", "README.md"):  # shard output folders
            continue
        found.append(path)
    return sorted(found)


_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_INLINE = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)


def relative_links(text: str) -> list[str]:
    """Link targets that are paths in the repository: no URL (scheme://, mailto:), no same-page anchor;
    code blocks and inline code skipped."""
    text = _CODE.sub("", _FENCE.sub("", text))
    targets = _INLINE.findall(text) + _REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^[a-zA-Z][\w+.-]*:", t) and not t.startswith("#")]


def test_the_link_finder_skips_urls_anchors_and_code():
    text = (
        "[a](docs/a.md#x) ![p](pictures/p.png) [u](https://x.org/y.md) [s](#here) `[c](no.md)`\n"
        "```\n[d](no.md)\n```\n[ref]: ../shards/README.md\n"
    )
    assert relative_links(text) == ["docs/a.md#x", "pictures/p.png", "../shards/README.md"]


def test_markdown_links_point_at_files_that_exist():
    files = markdown_files()
    assert {"README.md", "docs/architecture.md", "shards/README.md"} <= {f.relative_to(ROOT).as_posix() for f in files}
    broken = []
    for md in files:
        for target in relative_links(md.read_text()):
            path = target.split("#", 1)[0].split("?", 1)[0]
            resolved = (ROOT / path.lstrip("/")) if path.startswith("/") else (md.parent / path)
            if path and not resolved.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "Markdown links to files that do not exist:\n" + "\n".join(broken)
