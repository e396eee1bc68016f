"""Which modules of the `nmt` package a Python file imports, found by reading the code.

One answer for two users: the dvc.yaml deps test (every module a stage's entry point imports is
one of its deps) and the training resume fingerprint (`nmt.training`: a change in any module the
train stage runs makes an unfinished checkpoint stale). Imports are read with `ast`, transitively
and including those inside functions; imports under `if TYPE_CHECKING:` are skipped. A package's
`__init__.py` is followed, and counted as a source only when it has code (imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "nmt"
PACKAGE_DIR = Path(__file__).resolve().parent


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names `tree` may import: modules, and `module.name` for `from module import name`."""
    names: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)  # type: ignore[attr-defined]
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parts = module.split(".")
                parent = parts if is_package else parts[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        stack.extend(ast.iter_child_nodes(node))
    return {n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")}


def _module_file(name: str, package_dir: Path) -> Path | None:
    parts = name.split(".")[1:]
    if not parts:
        return package_dir / "__init__.py"
    rel = Path(*parts)
    for candidate in (package_dir / rel / "__init__.py", package_dir / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, package_dir: Path) -> str:
    rel = path.resolve().relative_to(package_dir).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _has_code(init: Path) -> bool:
    tree = ast.parse(init.read_text(encoding="utf-8"))
    return any(isinstance(n, ast.Import | ast.ImportFrom) and getattr(n, "module", "") !=
               "__future__" for n in ast.walk(tree))


def package_imports(entry: Path, package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The package's source files that `entry` imports, directly or through each other.

    Args:
        entry: a Python file (a stage script, or a module of the package, which is included).
        package_dir: the folder of the `nmt` package.

    Returns:
        Sorted absolute paths; empty `__init__.py` files (docstring only) are left out.
    """
    package_dir = package_dir.resolve()
    entry = entry.resolve()
    inside = entry.is_relative_to(package_dir)
    seen: set[Path] = {entry} if inside else set()
    todo = [entry]
    while todo:
        path = todo.pop()
        module = _module_name(path, package_dir) if path.is_relative_to(package_dir) else ""
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(tree, module, path.name == "__init__.py"):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__
                found = _module_file(".".join(parts[:i]), package_dir)
                if found is not None and found not in seen:
                    seen.add(found)
                    todo.append(found)
    return sorted(p for p in seen if p.name != "__init__.py" or _has_code(p) or p == entry)
