"""The README and docs/ say what runs: every Python example runs as written (reference backend on CPU),
the README's ``python -m mmkernels`` commands run and succeed, and every relative link resolves."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mmkernels

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def _python_blocks() -> list:
    params = []
    for path in DOCS:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), re.S) if "import mmkernels" in b]
        params += [pytest.param(block, id=f"{path.relative_to(ROOT)}-{i}") for i, block in enumerate(blocks)]
    return params


@pytest.mark.parametrize("block", _python_blocks())
def test_example_runs(block, request):
    if "import transformers" in block or "mmkernels.transformers" in block:
        pytest.importorskip("transformers", minversion="5", reason="the optional transformers extra is not installed")
    if "deepspeed" in block:
        pytest.importorskip("deepspeed.moe.layer", reason="DeepSpeed (the test extra) is not installed")
    with mmkernels.use_backend("reference"):
        exec(compile(block, request.node.callspec.id, "exec"), {})


def _cli_commands() -> list[str]:
    """The ``python -m mmkernels ...`` lines of the README's bash blocks (comments stripped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("python -m mmkernels"):
                lines.append(line)
    return lines


def _cli_runs() -> list[tuple[str, ...]]:
    """The arguments each README command is run with.  A ``verify`` of every operator (minutes on a
    CPU) runs as ``verify --quick --op plora``: the same entry point, a few seconds."""
    runs = []
    for command in _cli_commands():
        args = shlex.split(command)[3:]
        if args[0] == "verify" and "--quick" not in args:
            args += ["--quick", "--op", "plora"]
        runs.append(tuple(args))
    return sorted(set(runs))


def test_readme_shows_the_cli_quickstart():
    commands = _cli_commands()
    for want in ("python -m mmkernels info", "python -m mmkernels verify --quick --op plora", "python -m mmkernels verify"):
        assert want in commands, commands


@pytest.mark.parametrize("args", _cli_runs(), ids=" ".join)
def test_cli_command_runs(args, tmp_path):
    """Each README command runs from outside the repository and exits 0."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-m", "mmkernels", *args], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    if args[0] == "verify":
        assert "verification PASSED" in r.stdout, r.stdout[-3000:]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation except '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", text, re.M)}


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = re.sub(r"`[^`\n]*`", "CODE", re.sub(r"```.*?```", "", path.read_text(), flags=re.S))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
