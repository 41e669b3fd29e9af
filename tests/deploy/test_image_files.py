"""The image's file set holds every package the console script imports (fast: no image is built).

An image built from a Dockerfile that copied `libs services data` but not `klinebus/` died at start
with ModuleNotFoundError. Here the file set is what the Dockerfile's runtime stages COPY from the
build context, filtered by .dockerignore, exactly as a builder sends it; the test

* reads every first-party import of the code (ast: imports, and importlib.import_module with a
  literal name) and fails on one whose package the image leaves out, and
* materialises the file set in a temporary folder and runs `klinebus --help` and imports each
  service's app module from it alone (the repository and its editable install hidden), as
  `klinebus run <service>` does in the image.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
RUNTIME_STAGES = ("runtime", "cuda")


def stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        words = logical.split()
        if words[0].upper() == "FROM":
            name = words[3] if len(words) >= 4 and words[2].upper() == "AS" else f"stage{len(out)}"
            current = out.setdefault(name, [])
        elif current is not None:
            current.append(logical)
        logical = ""
    return out


def copied_from_context(stage: list[str]) -> list[str]:
    """Sources of the stage's COPY/ADD instructions that read the build context (no --from)."""
    sources: list[str] = []
    for ins in stage:
        words = ins.split()
        if words[0].upper() not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        sources += [a.rstrip("/") for a in args[:-1]]
    return sources


class DockerIgnore:
    """.dockerignore as Docker reads it: patterns in order, the last match wins, `!` re-includes."""

    def __init__(self, text: str) -> None:
        self.rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            self.rules.append((negate, pattern))

    def _match(self, pattern: str, path: str) -> bool:
        parts = path.split("/")
        # a pattern matches a path or any of its parent folders
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if pattern.startswith("**/"):
                tail = pattern[3:]
                if any(fnmatch.fnmatchcase("/".join(parts[j:i]), tail) for j in range(i)):
                    return True
            elif fnmatch.fnmatchcase(prefix, pattern) and prefix.count("/") == pattern.count("/"):
                return True
        return False

    def included(self, path: str) -> bool:
        keep = True
        for negate, pattern in self.rules:
            if self._match(pattern, path):
                keep = negate
        return keep


def file_set() -> set[str]:
    """Repository-relative paths the runtime stages receive from the build context."""
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    all_stages = stages(DOCKERFILE.read_text())
    files: set[str] = set()
    for name in RUNTIME_STAGES:
        assert name in all_stages, f"Dockerfile has no stage {name!r}"
        for src in copied_from_context(all_stages[name]):
            files |= {f for f in context_files(REPO / src, ignore)}
    return files


def context_files(root: Path, ignore: DockerIgnore):
    """Files under ``root`` that .dockerignore lets into the build context (a folder is walked
    only when it, or something a `!` pattern re-includes below it, can be in)."""
    if root.is_file():
        rel = str(root.relative_to(REPO))
        if ignore.included(rel):
            yield rel
        return
    reincluded = [p for negate, p in ignore.rules if negate]
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(REPO)
        dirs[:] = [d for d in dirs if ignore.included(str(base / d))
                   or any(p.startswith(str(base / d) + "/") for p in reincluded)]
        for n in names:
            rel = str(base / n)
            if ignore.included(rel):
                yield rel


def first_party() -> set[str]:
    return {p.name for p in REPO.iterdir() if (p / "__init__.py").exists()} | {
        p.stem for p in REPO.glob("*.py")}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return names


def test_every_package_the_code_imports_is_in_the_image():
    files = file_set()
    shipped_dirs = {f.split("/")[0] for f in files}
    ours = first_party()
    code = [REPO / f for f in files if f.endswith(".py")]
    assert any(f.startswith("klinebus/") for f in files), "the console script's own package is not copied"
    missing: dict[str, str] = {}
    for path in code:
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in ours and top not in shipped_dirs:
                missing.setdefault(top, str(path.relative_to(REPO)))
    assert missing == {}, f"imported but left out of the image (package: first importer): {missing}"
    # and pip's package discovery picks each of them up
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(any(fnmatch.fnmatchcase(top, pat) for pat in include) for top in shipped_dirs & ours)
    # the console script's target module ships
    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["klinebus"]
    assert script.split(":")[0].replace(".", "/") + ".py" in files


def test_the_checker_sees_a_left_out_package(tmp_path):
    """The old Dockerfile's file set (no klinebus/) fails the same check."""
    old = "FROM python:3.11-slim AS runtime\nCOPY pyproject.toml README.md ./\nCOPY libs ./libs\nCOPY services ./services\n"
    sources = copied_from_context(stages(old)["runtime"])
    assert "klinebus" not in {s.split("/")[0] for s in sources}
    ignore = DockerIgnore("*\n!libs/\n**/__pycache__\n")
    assert ignore.included("libs/common/bus.py") and not ignore.included("klinebus/cli.py")
    assert not ignore.included("libs/common/__pycache__/x.pyc")


PROBE = """
import importlib, os, sys
root, repo = sys.argv[1], sys.argv[2]
# the repository and its editable install are hidden: only the copied file set can answer
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [root] + [p for p in sys.path if p and os.path.abspath(p) != repo]
from klinebus.cli import SERVICES, app_module, main
for service in SERVICES:
    module = app_module(service)
    assert module.__file__.startswith(root), (service, module.__file__)
try:
    main(["--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("ok")
"""


@pytest.mark.timeout(240)
def test_klinebus_runs_from_the_image_file_set_alone(tmp_path):
    for rel in file_set():
        dest = tmp_path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",) and not k.startswith("KLINEBUS_")}
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok") and "run" in proc.stdout


def test_dependencies_are_installed_before_any_code_is_copied():
    """A code change must not rebuild the dependency layer (llama.cpp for vlm/trainer): the stages
    that install dependencies read only the requirements list, and each runtime stage copies its
    venv before the code."""
    all_stages = stages(DOCKERFILE.read_text())
    for name in ("builder", "deps", "cuda-builder"):
        assert copied_from_context(all_stages[name]) == [], f"{name} copies from the build context"
    assert set(copied_from_context(all_stages["requirements"])) <= {"scripts/image-requirements.py", "pyproject.toml"}
    for name in RUNTIME_STAGES:
        ins = [i.split()[0].upper() + (" --from" if "--from=" in i else "") for i in all_stages[name]]
        assert ins.index("COPY --from") < ins.index("COPY"), f"{name}: code copied before the dependencies"


# --- each service's image holds only its extra: its service must still start -------------------------

EXTRA_PROBE = """
import importlib.metadata as md, json, re, sys
allowed, service = set(json.loads(sys.argv[1])), sys.argv[2]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
blocked = {top for top, dists in md.packages_distributions().items()
           if not any(norm(d) in allowed for d in dists)} - set(sys.stdlib_module_names)

class NotInThisImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not in this image)", name=name)
        return None

sys.meta_path.insert(0, NotInThisImage())
from klinebus.cli import app_module, build_parser
build_parser()  # what `klinebus run <service>` builds before it runs anything
app_module(service)
print("ok")
"""


def _installed_closure(requirements: list[str]) -> set[str]:
    """Distribution names a pip install of ``requirements`` pulls in, read from the installed metadata."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    seen: set[tuple[str, frozenset]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        key = (norm(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            deps = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for dep in map(Requirement, deps):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                stack.append(dep)
    return {name for name, _ in seen}


@pytest.mark.parametrize("service", ["ingest", "archive", "features", "charts", "inference", "vlm", "trainer", "alerts"])
def test_each_service_starts_with_only_its_own_extra_installed(service):
    """`klinebus run <service>` builds the whole command line (every service's subcommands) before it
    runs: a subcommand that imports another extra's package at registration would stop the service
    in its own image (the alerts image has no pandas)."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("image_requirements", REPO / "scripts" / "image-requirements.py")
    reqs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reqs)
    extra = {"archive": "ingest"}.get(service, service)
    pinned = reqs.requirements(tomllib.loads((REPO / "pyproject.toml").read_text()), [extra])
    allowed = _installed_closure(pinned) | {"klinebus", "pip", "setuptools", "wheel"}
    proc = subprocess.run([sys.executable, "-c", EXTRA_PROBE, json.dumps(sorted(allowed)), service], cwd=REPO,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
