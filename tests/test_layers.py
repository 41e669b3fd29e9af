"""Layers only point down: klinebus (composition root) -> services -> libs.indicators -> libs.common.

Read from the source with ``ast`` (no import side effects), including relative
imports and ``importlib.import_module("...")`` with a literal name, so an arrow
that runs up or sideways fails here before review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT_PACKAGE = "klinebus"
# A lib may import only the libs listed for it (besides itself and third-party packages).
LIB_MAY_IMPORT = {"common": set(), "indicators": {"common"}, "charting": {"common", "indicators"}}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(root: Path, path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(root, path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
                out += [stem] if node.module else [f"{stem}.{a.name}" for a in node.names]
            elif node.module:
                out.append(node.module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], (ast.Constant, ast.JoinedStr))
        ):
            first = node.args[0]
            text = first.value if isinstance(first, ast.Constant) else "".join(
                v.value for v in first.values if isinstance(v, ast.Constant)
            )
            if isinstance(text, str):
                out.append(text)
    return out


def _layer(module: str) -> tuple[str, str | None]:
    """('root'|'service'|'lib'|'other', the service or lib name)."""
    parts = module.split(".")
    if parts[0] == ROOT_PACKAGE:
        return "root", None
    if parts[0] == "services":
        return "service", parts[1] if len(parts) > 1 and parts[1] else ""
    if parts[0] == "libs":
        return "lib", parts[1] if len(parts) > 1 else ""
    return "other", None


def violations(root: Path) -> list[str]:
    bad = []
    for top in ("libs", "services", ROOT_PACKAGE):
        for path in sorted((root / top).rglob("*.py")) if (root / top).exists() else []:
            src_layer, src_name = _layer(_module_name(root, path))
            for target in _imported(root, path):
                dst_layer, dst_name = _layer(target)
                where = f"{path.relative_to(root)} -> {target}"
                if dst_layer == "root" and src_layer != "root":
                    bad.append(f"{where}: nothing imports the composition root")
                elif src_layer == "lib" and dst_layer == "service":
                    bad.append(f"{where}: a lib imports a service")
                elif src_layer == "lib" and dst_layer == "lib" and dst_name and dst_name != src_name:
                    if dst_name not in LIB_MAY_IMPORT.get(src_name or "", set()):
                        bad.append(f"{where}: libs.{src_name} may not import libs.{dst_name}")
                elif src_layer == "service" and dst_layer == "service" and dst_name != src_name:
                    bad.append(f"{where}: a service imports another service")
    return bad


def test_the_import_graph_only_points_down():
    assert violations(REPO) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


CLEAN = {
    "libs/common/bus.py": "import redis\n",
    "libs/indicators/batch.py": "from libs.common import bus\n",
    "services/features/app.py": "from libs.indicators import batch\nfrom . import checkpoint\n",
    "services/features/checkpoint.py": "",
    "services/charts/app.py": "from libs.indicators.batch import x\n",
    "klinebus/cli.py": "import services.features.app\nimport importlib\nimportlib.import_module('services.charts.app')\n",
}


def test_a_clean_synthetic_tree_passes(tmp_path):
    assert violations(_tree(tmp_path, CLEAN)) == []


@pytest.mark.parametrize(
    "path, source, reason",
    [
        ("libs/common/topics.py", "from services.features import app\n", "a lib imports a service"),
        ("libs/indicators/x.py", "import services.charts.app\n", "a lib imports a service"),
        ("libs/common/y.py", "import importlib\nimportlib.import_module(f'services.{name}.app')\n", "a lib imports a service"),
        ("libs/common/z.py", "from libs.indicators import batch\n", "libs.common may not import libs.indicators"),
        ("services/charts/render.py", "from services.features.app import create\n", "a service imports another service"),
        ("services/charts/sub/deep.py", "from ...features import app\n", "a service imports another service"),
        ("services/features/__main__.py", "from klinebus.cli import main\n", "nothing imports the composition root"),
        ("libs/common/w.py", "import klinebus\n", "nothing imports the composition root"),
    ],
)
def test_an_arrow_up_or_sideways_is_reported(tmp_path, path, source, reason):
    found = violations(_tree(tmp_path, {**CLEAN, path: source}))
    assert len(found) == 1 and found[0].startswith(path) and found[0].endswith(reason), found
