#!/usr/bin/env python3
"""Print the pinned requirements of klinebus's core plus the given extras, one a line, from pyproject.toml.

    python3 scripts/image-requirements.py pyproject.toml features [more extras ...]

The Dockerfile installs these before it copies any code, so a code change reuses the dependency
layer (llama.cpp is not rebuilt), and an unrelated pyproject.toml edit (ruff, pytest settings)
yields the same list, so the layer is reused too. Self-references (``klinebus[a,b]``) are expanded.
Standard library only (tomllib, Python 3.11+).
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            m = re.fullmatch(rf"\s*{re.escape(name)}\s*\[([^\]]*)\]\s*", req)
            if m:
                for extra in (e.strip() for e in m.group(1).split(",")):
                    expand(extra)
            elif req not in out:
                out.append(req)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"image-requirements: no extra {extra!r} in pyproject.toml (have: {', '.join(optional)})")
        seen.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        for e in extra.split(","):
            if e.strip():
                expand(e.strip())
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as fh:
        pyproject = tomllib.load(fh)
    print("\n".join(requirements(pyproject, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
