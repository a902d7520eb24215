"""Modules import downward only (README, "Layout"): config <- css/data/models/losses <-
methods <- train <- the entry points. A module that imports a higher layer fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "icd_dist"
ENTRY = ("run", "tune", "evaluate", "shards", "tasks", "cli")


def layer(module: str) -> int:
    """The layer of a dotted icd_dist module name (higher may import lower)."""
    parts = module.split(".")[1:]
    if not parts or parts[0] == "config":
        return 0
    if parts[0] in ("css", "data", "models", "losses"):
        return 1
    if parts[0] == "methods":
        return 2
    if parts[0] == "train":
        return 3
    assert parts[0] in ENTRY, module
    return 4


def imports(path: Path) -> set[str]:
    """The icd_dist modules `path` imports (at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("icd_dist"):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("icd_dist")}
    return out


def test_every_module_imports_downward_only():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("icd_dist", *path.relative_to(PACKAGE).with_suffix("").parts))
        name = name.removesuffix(".__init__")
        for imported in imports(path):
            if layer(imported) > layer(name):
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_map_knows_the_methods_package():
    assert layer("icd_dist.methods.icd") == 2 > layer("icd_dist.losses.icd_loss")
    assert layer("icd_dist.train.step0") > layer("icd_dist.methods")
