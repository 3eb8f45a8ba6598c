"""The README stays a front door and the docs stay true to the tree.

Four checks, each a small function of files and text so that the tests below can also feed it
a deliberately broken input and see it fail:

- every module under ``flora_lightning/`` is named by its path in ``docs/architecture.md``;
- every relative Markdown link in ``README.md`` and ``docs/**/*.md`` points at an existing file,
  and its ``#anchor``, if any, at a heading of that file (GitHub's slugs);
- ``README.md`` has at most 250 lines;
- every repository path the pages name in prose or code (``flora_lightning/clip/hub.py``,
  ``configs/quickstart.yaml``, ...) exists, so a moved module cannot leave a stale path behind.

Plain text and ``pathlib`` only: no import of the package (fast, and it cannot hide a module).
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flora_lightning"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"
README_MAX_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`+[^`]*`+")
# [text](target) and ![alt](target); the target ends at whitespace (a "title" may follow) or ")".
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # https:, mailto:, ...
REPO_PATH = re.compile(
    r"(?<![\w/.])((?:flora_lightning|tests|configs|experiments|flower_app|flower_app_secagg|docs)"
    r"/[\w/.\-]*\.(?:py|md|yaml|toml|json|png))(?![\w/])"
)


def package_modules(package: Path) -> list[str]:
    """Repository-relative paths of the package's modules, without ``__init__``/``__main__``."""
    return sorted(
        path.relative_to(package.parent).as_posix()
        for path in package.rglob("*.py")
        if path.name not in {"__init__.py", "__main__.py"} and "__pycache__" not in path.parts
    )


def modules_missing_from(text: str, modules: list[str]) -> list[str]:
    """The module paths that ``text`` does not name (a path must appear whole, as written)."""
    return [m for m in modules if not re.search(rf"(?<![\w/]){re.escape(m)}(?![\w/])", text)]


def prose_lines(text: str, drop_inline_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code removed unless told."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, INLINE_CODE.sub("", line) if drop_inline_code else line))
    return lines


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading's text: markup dropped, lower case, punctuation removed
    (letters, digits, ``_``, ``-`` and spaces kept), spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading's anchor in a Markdown text; repeated slugs get ``-1``, ``-2``, ..."""
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(markdown, drop_inline_code=False):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def link_targets(markdown: str) -> list[tuple[int, str]]:
    """(line number, target) of every link outside code; a link's text may wrap lines."""
    lines = prose_lines(markdown)
    text = "\n".join(line for _, line in lines)
    starts = [0]
    for _, line in lines:
        starts.append(starts[-1] + len(line) + 1)
    found = []
    for match in LINK.finditer(text):
        index = bisect.bisect_right(starts, match.start()) - 1
        found.append((lines[index][0], match.group(1)))
    return found


def broken_links(markdown_file: Path) -> list[str]:
    """Relative links of ``markdown_file`` whose file, or whose ``#anchor``, does not exist."""
    problems = []
    for number, target in link_targets(markdown_file.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        destination = (markdown_file.parent / path_part) if path_part else markdown_file
        where = f"{markdown_file.name}:{number}: ({target})"
        if not destination.exists():
            problems.append(f"{where} no such file {destination}")
        elif anchor and destination.suffix == ".md":
            if anchor not in anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{where} no heading with anchor #{anchor} in {destination}")
    return problems


def too_long(markdown_file: Path, limit: int) -> int | None:
    """The file's line count when it exceeds ``limit``, else ``None``."""
    count = len(markdown_file.read_text(encoding="utf-8").splitlines())
    return count if count > limit else None


def missing_paths(markdown_file: Path, root: Path) -> list[str]:
    """Repository paths named in ``markdown_file`` (anywhere, code included) that exist neither
    from the repository root nor from the file's folder."""
    named = REPO_PATH.findall(markdown_file.read_text(encoding="utf-8"))
    return sorted(
        {p for p in named if not (root / p).exists() and not (markdown_file.parent / p).exists()}
    )


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


# ---------------------------------------------------------------- the repository's own docs


def test_every_module_is_named_in_the_architecture_page():
    modules = package_modules(PACKAGE)
    assert len(modules) > 50  # the walk found the package
    missing = modules_missing_from(ARCHITECTURE.read_text(encoding="utf-8"), modules)
    assert not missing, f"docs/architecture.md does not name: {missing}; add one line each"


@pytest.mark.parametrize(
    "markdown_file", markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix()
)
def test_every_relative_link_resolves(markdown_file):
    assert not broken_links(markdown_file)


# Dated result files record what was true when they were measured: not checked for paths.
@pytest.mark.parametrize(
    "markdown_file",
    [f for f in markdown_files() if "results" not in f.relative_to(ROOT).parts],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_every_named_repository_path_exists(markdown_file):
    assert not missing_paths(markdown_file, ROOT)


def test_readme_is_a_front_door():
    assert too_long(README, README_MAX_LINES) is None, (
        f"README.md has more than {README_MAX_LINES} lines; move the detail to a page in docs/"
    )


# ------------------------------------------------- the checks fail on deliberately broken input


def test_a_module_missing_from_the_page_is_reported(tmp_path):
    package = tmp_path / "flora_lightning"
    (package / "clip").mkdir(parents=True)
    for name in ("__init__.py", "clip/__init__.py", "clip/backbone.py", "clip/hub.py", "cli.py"):
        (package / name).write_text("")
    modules = package_modules(package)
    assert modules == [
        "flora_lightning/cli.py",
        "flora_lightning/clip/backbone.py",
        "flora_lightning/clip/hub.py",
    ]
    page = "`flora_lightning/cli.py`, `flora_lightning/clip/backbone.py`; hub.py, clip/hub.py"
    assert modules_missing_from(page, modules) == ["flora_lightning/clip/hub.py"]
    # A longer path does not count for a shorter one.
    assert modules_missing_from("flora_lightning/clip/hub.pyc", ["flora_lightning/clip/hub.py"])


@pytest.mark.parametrize(
    ("link", "problem"),
    [
        ("[a](missing.md)", "no such file"),
        ("[a](page.md#no-such-heading)", "no heading with anchor #no-such-heading"),
        ("[a](#nowhere)", "no heading with anchor #nowhere"),
        ("![plot](sub/plot.png)", "no such file"),
        ("[a](page.md#the-papers-grid)", "no heading with anchor #the-papers-grid"),
        ("[a link whose text\nwraps](missing.md)", "doc.md:3: (missing.md) no such file"),
    ],
)
def test_a_broken_link_is_reported(tmp_path, link, problem):
    (tmp_path / "page.md").write_text(
        "# Title\n\n## The paper's grid: `flora sweep`\n\n## Setup\n\n## Setup\n"
        "```toml\n# not a heading\n```\n"
    )
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Doc\n\ntext {link} text\n")
    problems = broken_links(doc)
    assert len(problems) == 1 and problem in problems[0], problems


@pytest.mark.parametrize(
    "link",
    [
        "[a](page.md)",
        "[a](page.md#the-papers-grid-flora-sweep)",
        "[a](page.md#setup-1)",
        "[a](#doc)",
        "[a](https://flower.ai/#x)",
        "`[a](missing.md)` in inline code",
    ],
)
def test_a_good_link_passes(tmp_path, link):
    (tmp_path / "page.md").write_text(
        "# Title\n\n## The paper's grid: `flora sweep`\n\n## Setup\n\n## Setup\n"
    )
    doc = tmp_path / "doc.md"
    doc.write_text(f"# Doc\n\ntext {link} text\n```\n[a](missing.md)\n```\n")
    assert broken_links(doc) == []


def test_a_heading_in_a_code_block_is_no_anchor():
    text = "# Real\n```toml\n# ~/.flwr/config.toml\n```\n"
    assert anchors(text) == {"real"}


@pytest.mark.parametrize(
    ("heading", "slug"),
    [
        ("The paper's grid: `flora sweep`", "the-papers-grid-flora-sweep"),
        ("Privacy: differential privacy and secure aggregation", "privacy-differential-privacy-and-secure-aggregation"),
        ("Unreliable clients, server optimisers, personalised evaluation", "unreliable-clients-server-optimisers-personalised-evaluation"),
        ("Secure aggregation (SecAgg+)", "secure-aggregation-secagg"),
        ("`client_state/`: what a client keeps", "client_state-what-a-client-keeps"),
        ("Dirichlet(β) and [links](x.md)", "dirichletβ-and-links"),
    ],
)  # fmt: skip
def test_github_slugs(heading, slug):
    assert github_slug(heading) == slug


def test_a_stale_repository_path_is_reported(tmp_path):
    (tmp_path / "flora_lightning" / "clip").mkdir(parents=True)
    (tmp_path / "flora_lightning" / "clip" / "hub.py").write_text("")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "`flora_lightning/clip/hub.py` and `flora_lightning/hub.py`;\n"
        "```\npython flora_lightning/loop.py\n```\nnot a path: my_flora_lightning/x.py\n"
    )
    assert missing_paths(doc, tmp_path) == ["flora_lightning/hub.py", "flora_lightning/loop.py"]


def test_a_readme_over_the_limit_is_reported(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("line\n" * (README_MAX_LINES + 1))
    assert too_long(readme, README_MAX_LINES) == README_MAX_LINES + 1
    readme.write_text("line\n" * README_MAX_LINES)
    assert too_long(readme, README_MAX_LINES) is None
