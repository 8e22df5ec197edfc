"""docs/architecture.md states the layers of modules; every import in the package obeys it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pyro_bqn"
ROW = re.compile(r"^\| (\d+) \| (.+?) \| .+ \|$")


def _layers() -> dict[str, int]:
    """``{module prefix: layer}`` from the table of docs/architecture.md."""
    layers = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        match = ROW.match(line)
        if match:
            for name in re.findall(r"`([\w.]+)`", match.group(2)):
                layers[name] = int(match.group(1))
    return layers


LAYERS = _layers()


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer_of(module: str) -> tuple[str, int] | None:
    """The most specific listed prefix of ``module`` and its layer."""
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix, LAYERS[prefix]
    return None


def _imported_modules(path: Path) -> list[str]:
    """Every pyro_bqn module ``path`` imports, at top level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import, resolved from the importing package
                package = _module_name(path).split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pyro_bqn import nn`` imports the module pyro_bqn.nn.
            found += [f"{base}.{alias.name}" for alias in node.names] + [base]
    return [name for name in found if name.startswith("pyro_bqn.")]


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_the_table_names_the_layers_in_order() -> None:
    assert LAYERS["pyro_bqn.distributions"] < LAYERS["pyro_bqn.nn"] < LAYERS["pyro_bqn.infer"]
    assert LAYERS["pyro_bqn.infer"] < LAYERS["pyro_bqn.diagnostics"] < LAYERS["pyro_bqn.cli"]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_goes_down_the_layers(path: Path) -> None:
    source = _module_name(path)
    placed = _layer_of(source)
    assert placed is not None, f"{source} has no layer in docs/architecture.md"
    prefix, layer = placed
    for target in _imported_modules(path):
        target_placed = _layer_of(target)
        if target_placed is None:  # an attribute, e.g. ``from pyro_bqn.nn import Sign``
            continue
        target_prefix, target_layer = target_placed
        if target_prefix == prefix:
            continue  # within its own subpackage or module
        assert target_layer < layer, (
            f"{source} (layer {layer}) imports {target} (layer {target_layer}); "
            "docs/architecture.md allows only lower layers"
        )


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    # The rule must be able to fail: nn importing infer, the direction issue 17 removed.
    assert _layer_of("pyro_bqn.nn.recalibrate")[1] <= _layer_of("pyro_bqn.infer.predict")[1]
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from pyro_bqn.infer import predict\n")
    assert "pyro_bqn.infer" in _imported_modules(module)
