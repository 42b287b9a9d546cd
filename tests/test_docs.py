"""The documentation is tested: every example in README.md and docs/*.md marked runnable runs as written,
and every relative link resolves.

An example is marked runnable by the line `<!-- docs-test -->` right before its fenced block (```bash or
```python). It runs in a directory holding `exports/tiny-pegasus-trained` (what `make demo` makes, built
once per test session), with this interpreter's `ortseq` first on PATH; a bash example runs under
`set -euo pipefail`, in a process group of its own that is killed afterwards (a server it started goes
with it), and port 8080 is replaced by a free one. Links: every `[text](target)` outside code that is not
a URL names a file that exists, and a `#anchor` names a heading of that file.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- docs-test -->"
LANGUAGES = ("bash", "python")
EXAMPLE_TIMEOUT_S = 300
DEMO_EXPORT = "exports/tiny-pegasus-trained"


@dataclass(frozen=True)
class Example:
    page: Path
    line: int  # of its opening fence, 1-based
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def marked_examples(page: Path) -> list[Example]:
    """The fenced blocks of page preceded by the marker line; a marker not followed by a fence is an error."""
    lines = page.read_text(encoding="utf-8").split("\n")
    examples = []
    for index, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[index + 1] if index + 1 < len(lines) else ""
        assert fence.startswith("```"), f"{page.name}:{index + 1}: {MARKER} is not followed by a fenced block"
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
        code = "\n".join(lines[index + 2 : end]) + "\n"
        examples.append(Example(page, index + 2, fence[3:].split()[0] if fence[3:].strip() else "", code))
    return examples


EXAMPLES = [example for page in PAGES for example in marked_examples(page)]


def test_the_marked_examples_are_bash_or_python_and_cover_the_quickstart():
    assert all(example.language in LANGUAGES for example in EXAMPLES), [e.name for e in EXAMPLES]
    readme = {example.language for example in EXAMPLES if example.page.name == "README.md"}
    assert readme == set(LANGUAGES) and len(EXAMPLES) >= 4, [e.name for e in EXAMPLES]


@pytest.fixture(scope="module")
def demo_dir(trained_export, tmp_path_factory) -> Path:
    """A directory as `make demo` leaves it: exports/tiny-pegasus-trained."""
    root = tmp_path_factory.mktemp("docs")
    (root / DEMO_EXPORT).parent.mkdir(parents=True)
    (root / DEMO_EXPORT).symlink_to(trained_export, target_is_directory=True)
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_example(example: Example, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if example.language == "python":
        command = [sys.executable, "-c", example.code]
    else:
        command = ["bash", "-c", "set -euo pipefail\n" + example.code.replace("8080", str(free_port()))]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=EXAMPLE_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever the example left running (a server)
        except ProcessLookupError:
            pass
        process.wait()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.parametrize("example", EXAMPLES, ids=[example.name for example in EXAMPLES])
def test_a_marked_example_runs_as_written(example, demo_dir):
    result = run_example(example, demo_dir)
    assert result.returncode == 0, f"{example.name} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip() and "Traceback" not in result.stderr, result.stderr[-3000:]


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def prose(page: Path) -> str:
    """The page without its fenced blocks and inline code (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", prose(page), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


def test_the_link_check_finds_links_and_can_fail(tmp_path):
    """The checker sees the README's links, and a missing file or heading counts as broken."""
    assert {"docs/benchmarks.md", "docs/serving.md"} <= set(relative_links(ROOT / "README.md"))
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) `[code](ignored.md)`\n")
    assert relative_links(page) == ["#a-title", "missing.md"] and anchors(page) == {"a-title"}
