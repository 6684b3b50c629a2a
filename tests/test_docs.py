"""The walkthrough pages run: every ```python block of docs/learn/*.md is executed, and what it prints must equal
the ```text block that follows it.

Convention (docs/learn/README in docs/index.md): a page's python blocks run in order in one namespace, as a reader
would paste them into one session. A python block followed by a text block (only blank lines between) must print
exactly that text; a python block with no text block after it must print nothing. Normalisation: trailing
whitespace of each line and leading/trailing blank lines are ignored; nothing else (a shape, an id or a count that
differs fails the test, with the page, the line and a diff). A page holding `<!-- docs-test: slow -->` is marked
slow. Other fences (```console, ```text without a python block before it) are not run.

Also checked: every relative link of docs/index.md and docs/learn/ points to an existing file; a link of the form
[`Name.attr`](path.py#L12) names a class or function defined in that file and lands on it: its line anchor is the
line of that `def` / `class` (the pages link to the code they explain); every image is under 200 KB.

`python -m tests.test_docs --fill docs/learn/PAGE.md` rewrites a page's text blocks with what its snippets print
now (for writing a page; review the diff against the facts the page claims before committing).
`python -m tests.test_docs --anchors docs/learn/*.md docs/index.md` rewrites the line anchors of the code links to
where each name is defined now (after the code moved).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted((DOCS / "learn").glob("*.md"))
LINKED_PAGES = [DOCS / "index.md", *PAGES]
SLOW_MARK = "<!-- docs-test: slow -->"
FENCE = re.compile(r"^```([\w-]*)\s*$")
IMAGE_LIMIT = 200_000  # bytes


@dataclass
class Snippet:
    code: str
    expected: str | None  # None: the block must print nothing
    line: int  # 1-based line of the code's first line
    text_span: tuple[int, int] | None  # 0-based [start, end) lines of the text block's body, for --fill


def parse(text: str) -> list[Snippet]:
    """The python blocks of a page, each with the text block that follows it (if any)."""
    lines = text.splitlines()
    blocks: list[tuple[str, int, int]] = []  # (language, first body line, end line exclusive), 0-based
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"line {i + 1}: a ``` fence is never closed")
        blocks.append((m.group(1), i + 1, j))
        i = j + 1
    out = []
    for n, (lang, start, end) in enumerate(blocks):
        if lang != "python":
            continue
        code = "\n".join(lines[start:end])
        follower = blocks[n + 1] if n + 1 < len(blocks) else None
        between = lines[end + 1:follower[1] - 1] if follower else []
        if follower and follower[0] == "text" and all(not s.strip() for s in between):
            out.append(Snippet(code, "\n".join(lines[follower[1]:follower[2]]), start + 1, (follower[1], follower[2])))
        else:
            out.append(Snippet(code, None, start + 1, None))
    return out


def normalise(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).strip("\n")


def run_snippets(snippets: list[Snippet], where: str) -> list[str]:
    """Execute the snippets in one namespace; raise AssertionError at the first output that differs from its text.

    Returns what each snippet printed.
    """
    namespace: dict = {"__name__": "__docs__"}
    printed = []
    for s in snippets:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(s.code, f"{where}:{s.line}", "exec"), namespace)  # noqa: S102 - the docs' own code
        got, want = normalise(buf.getvalue()), normalise(s.expected or "")
        printed.append(buf.getvalue())
        if got != want:
            if s.expected is None:
                raise AssertionError(f"{where}:{s.line}: the snippet prints but no ```text block follows it:\n{got}")
            diff = "\n".join(difflib.unified_diff(want.splitlines(), got.splitlines(), "the page says", "it prints",
                                                  lineterm=""))
            raise AssertionError(f"{where}:{s.line}: the output differs from the page\n{diff}")
    return printed


def _page_params() -> list:
    return [pytest.param(p, id=p.name, marks=[pytest.mark.slow] if SLOW_MARK in p.read_text() else [])
            for p in PAGES]


# ----------------------------------------------------------------------------------------------------------------
# The pages


def test_there_are_pages() -> None:
    names = [p.name for p in PAGES]
    assert len(names) >= 7, names
    for page in PAGES:
        assert parse(page.read_text()), f"{page.name} has no python snippets"


@pytest.mark.parametrize("page", _page_params())
def test_page_snippets_print_what_the_page_says(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch

    monkeypatch.chdir(tmp_path)  # a snippet that writes a file writes it here, never into the repository
    threads = torch.get_num_threads()
    # the tiny models' small ops run 50x slower with 2 threads on a busy 2-core machine (measured: 1 s vs 0.02 s
    # per tiny UNet call); one thread keeps the page tests at seconds and changes no printed value
    torch.set_num_threads(1)
    try:
        run_snippets(parse(page.read_text()), str(page.relative_to(ROOT)))
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# The harness itself fails when it should


def test_harness_catches_a_wrong_claim() -> None:
    page = "```python\nimport torch\nprint(tuple(torch.zeros(1, 77, 768).shape))\n```\n\n```text\n(1, 77, 1024)\n```\n"
    with pytest.raises(AssertionError, match=r"<page>:2: the output differs.*\n(.*\n)*-\(1, 77, 1024\)\n\+\(1, 77, 768\)"):
        run_snippets(parse(page), "<page>")
    good = page.replace("(1, 77, 1024)", "(1, 77, 768)  ")  # trailing spaces are normalised away
    assert run_snippets(parse(good), "<page>") == ["(1, 77, 768)\n"]


def test_harness_catches_unclaimed_output_and_shares_the_namespace() -> None:
    page = "```python\nx = 3\n```\n\nprose\n\n```python\nprint(x + 1)\n```\nprose\n```text\n4\n```\n"
    with pytest.raises(AssertionError, match="prints but no ```text block follows"):
        run_snippets(parse(page), "<page>")  # prose between the code and the text block: not its output
    assert run_snippets(parse(page.replace("```\nprose\n```text", "```\n```text")), "<page>") == ["", "4\n"]


def test_harness_rejects_an_unclosed_fence() -> None:
    with pytest.raises(ValueError, match="never closed"):
        parse("```python\nprint(1)\n")


# ----------------------------------------------------------------------------------------------------------------
# Links and images

LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def code_name(label: str, target: str) -> str | None:
    """The dotted name a link explains ([`Class.method`](file.py) -> "Class.method"), None for other links."""
    if not target.split("#")[0].endswith(".py") or not (label.startswith("`") and label.endswith("`")) \
            or "/" in label:
        return None
    name = label.strip("`").split("(")[0]
    return name if re.fullmatch(r"[A-Za-z_][\w.]*", name) else None


def definition_line(source: str, name: str) -> int | None:
    """The 1-based line where `name` ("func", "Class" or "Class.method"; a leading module path is ignored) is
    defined in `source`, or None."""
    lines = source.splitlines()
    parts = name.split(".")
    start = 0
    if len(parts) > 1:  # Class.method: the method's def after its class's line
        owner = next((i for i, line in enumerate(lines) if re.match(rf"class {parts[-2]}\b", line)), None)
        start = 0 if owner is None else owner
    for i in range(start, len(lines)):
        if re.match(rf"\s*(def|class) {parts[-1]}\b|{parts[-1]} = ", lines[i]):
            return i + 1
    return None


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: p.name)
def test_links_point_to_existing_files_and_names(page: Path) -> None:
    assert page.is_file(), page
    text = page.read_text()
    for label, target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name}: link [{label}]({target}) points to a missing file"
        name = code_name(label, target)
        if name is not None and not path.name.startswith(name.split(".")[-1]):
            line = definition_line(path.read_text(), name)
            assert line is not None, f"{page.name}: [{label}]({target}): no def/class {name} in {path.name}"
            assert target.endswith(f"#L{line}"), (
                f"{page.name}: [{label}]({target}) must land on line {line}, where {name} is defined "
                f"(python -m tests.test_docs --anchors {page.relative_to(ROOT)})")
        if path.suffix in (".png", ".svg"):
            assert path.stat().st_size <= IMAGE_LIMIT, f"{path.name} is {path.stat().st_size:,} bytes"


def set_anchors(page: Path) -> None:
    """Rewrite the line anchor of each code link of `page` to the line where its name is defined now."""
    def anchored(m: re.Match) -> str:
        label, target = m.group(1), m.group(2)
        name = code_name(label, target)
        path = (page.parent / target.split("#")[0]).resolve()
        if name is None or not path.is_file() or path.name.startswith(name.split(".")[-1]):
            return m.group(0)
        line = definition_line(path.read_text(), name)
        return m.group(0) if line is None else f"[{label}]({target.split('#')[0]}#L{line})"

    page.write_text(LINK.sub(anchored, page.read_text()))


# ----------------------------------------------------------------------------------------------------------------
# --fill


def fill(page: Path) -> None:
    """Rewrite the page's text blocks with what its snippets print now."""
    text = page.read_text()
    snippets = parse(text)
    lines = text.splitlines()
    outputs = []
    namespace: dict = {"__name__": "__docs__"}
    for s in snippets:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(s.code, f"{page}:{s.line}", "exec"), namespace)  # noqa: S102
        outputs.append(normalise(buf.getvalue()))
    for s, out in reversed(list(zip(snippets, outputs))):
        if s.text_span is not None:
            lines[s.text_span[0]:s.text_span[1]] = out.splitlines()
        elif out:
            print(f"{page}:{s.line}: prints but has no text block:\n{out}", file=sys.stderr)
    page.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("--fill", "--anchors"):
        raise SystemExit("usage: python -m tests.test_docs --fill|--anchors docs/learn/PAGE.md [...]")
    for arg in sys.argv[2:]:
        (fill if sys.argv[1] == "--fill" else set_anchors)(Path(arg))
