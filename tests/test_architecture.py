"""The package's shape as docs/architecture.md describes it: ``config.py`` is a leaf (it
imports nothing of pgscope but its errors, not even inside a function: the layers above
register their presets and checks with it), and every module and package of
``src/pgscope`` is placed in the document's layer table."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "pgscope"


def _pgscope_imports(path: Path) -> set[str]:
    """Every pgscope module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "pgscope" or n.startswith("pgscope."))
    return found


def test_config_is_a_leaf():
    assert _pgscope_imports(SRC / "config.py") == {"pgscope.errors"}


def test_the_leaf_check_sees_function_level_imports(tmp_path):
    hidden = tmp_path / "m.py"
    hidden.write_text("def f():\n    from pgscope.algos import presets\n    return presets\n")
    assert _pgscope_imports(hidden) == {"pgscope.algos"}


def test_every_module_and_package_is_in_the_layer_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("|"))
    named = set(re.findall(r"`([a-z_0-9]+(?:\.py|/))`", table))
    present = {p.name + "/" if p.is_dir() else p.name for p in SRC.iterdir()
               if (p.is_dir() and (p / "__init__.py").exists())
               or (p.suffix == ".py" and p.name != "__init__.py")}
    missing = sorted(present - named)
    assert not missing, f"docs/architecture.md's layer table does not place {missing}"
