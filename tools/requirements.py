"""Print requirement lists from pyproject.toml, the one place they are written (used by the Makefile).

    python tools/requirements.py torch      # the torch pin of [build-system] requires
    python tools/requirements.py build      # [build-system] requires
    python tools/requirements.py runtime    # [tool.mmkernels] dependencies (setup.py adds torch)
    python tools/requirements.py EXTRA...   # an extra (test, dev, transformers), self-references
                                            # such as "mmkernels[test]" expanded, plus the runtime list

One requirement per line; markers that do not apply to this interpreter are dropped.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors a TOML reader
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]


def _applies(req: str) -> bool:
    if ";" not in req:
        return True
    try:
        from pip._vendor.packaging.requirements import Requirement
    except ImportError:  # pragma: no cover
        from packaging.requirements import Requirement
    marker = Requirement(req).marker
    return marker is None or marker.evaluate()


def requirements(kind: str, data: dict) -> list[str]:
    name = data["project"]["name"]
    build = data["build-system"]["requires"]
    runtime = data["tool"]["mmkernels"]["dependencies"]
    extras = data["project"].get("optional-dependencies", {})
    if kind == "torch":
        return [r for r in build if re.match(r"torch\s*==", r)]
    if kind == "build":
        return list(build)
    if kind == "runtime":
        return list(runtime)
    if kind not in extras:
        raise SystemExit(f"unknown list {kind!r}; expected torch, build, runtime or one of {sorted(extras)}")
    out: list[str] = list(runtime)
    todo = [kind]
    seen = set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        for req in extras[extra]:
            m = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.strip())
            if m:
                todo.extend(e.strip() for e in m.group(1).split(","))
            else:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    reqs: list[str] = []
    for kind in argv:
        reqs.extend(requirements(kind, data))
    for r in dict.fromkeys(reqs):
        if _applies(r):
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
