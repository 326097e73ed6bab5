"""``docpipe <name> [flags]``: every stage and tool by name, as ``python -m stages.<name>`` or
``python -m toolkit.<name>`` runs it (the same flags, exit codes and ``result.json``).

``docpipe`` alone, or ``docpipe --help``, lists the names with the first line of each one's
documentation. The names are found in the ``stages`` and ``toolkit`` packages, so a new stage is a
new command without an edit here.
"""

from __future__ import annotations

import importlib.util
import pkgutil
import runpy
import sys

import stages
import toolkit

PACKAGES = {"stages": stages, "toolkit": toolkit}
NOT_COMMANDS = {"commands", "config_reference"}  # this module; a maintainer's script, run by make docs


def commands() -> dict[str, str]:
    """Each runnable name and the module that runs it: stages first, then tools."""
    found: dict[str, str] = {}
    for package_name, package in PACKAGES.items():
        for module in pkgutil.iter_modules(package.__path__):
            if module.name.startswith("_") or module.name in NOT_COMMANDS or module.name in found:
                continue
            found[module.name] = f"{package_name}.{module.name}"
    return found


def summary(module: str) -> str:
    """The first line of a command's documentation, read without running it."""
    spec = importlib.util.find_spec(f"{module}.__main__" if _is_package(module) else module)
    if spec is None or spec.origin is None:
        return ""
    import ast

    with open(spec.origin, encoding="utf-8") as source:
        doc = ast.get_docstring(ast.parse(source.read())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _is_package(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return bool(spec and spec.submodule_search_locations)


def usage() -> str:
    lines = ["usage: docpipe <command> [flags]   (docpipe <command> --help for its flags)", ""]
    found = commands()
    for package_name in PACKAGES:
        lines.append(f"{package_name}:")
        for name, module in found.items():
            if module.startswith(f"{package_name}."):
                lines.append(f"  {name:<16} {summary(module)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    module = commands().get(name)
    if module is None:
        print(f"docpipe: no command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv = [f"docpipe {name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
