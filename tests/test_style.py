"""Rules of DESIGN.md that a machine can check: short functions, and the import direction."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "glowtrain"


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):  # the cli package's modules too
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


def _imported(path: Path) -> set[str]:
    """Every module a file imports, by its full name (`glowtrain.cli.process`, `typer`)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from glowtrain import cli`
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _imports(module: str) -> set[str]:
    """The modules of ours that `module` imports, by their top-level name in the package (`cli`, not `cli.job`)."""
    ours = {name.removeprefix("glowtrain.").split(".")[0] for name in _imported(PACKAGE / f"{module}.py")
            if name.startswith("glowtrain.")}
    return {name for name in ours if (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()}


def test_no_function_in_the_package_is_longer_than_60_lines():
    long = [(name, length) for name, length in _functions() if length > 60]
    assert not long, long


def test_model_code_never_imports_training_files_or_the_cli():
    training_side = {"train", "cli", "runs", "checkpoint", "logs", "images", "sample", "analysis", "data", "loaders",
                     "cache", "run_data"}
    for module in ("flows", "model", "reversible", "objective", "losses"):
        assert not _imports(module) & training_side, module


def test_only_the_cli_package_imports_typer():
    outside = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
               if "cli" not in path.relative_to(PACKAGE).parts and any(
                   name == "typer" or name.startswith("typer.") for name in _imported(path))]
    assert outside == []
    assert any("typer" in _imported(path) for path in (PACKAGE / "cli").glob("*.py"))  # the check sees imports


def test_command_options_are_typed_with_optional_which_every_supported_typer_reads():
    """typer before 0.12.5 (pyproject allows 0.9) fails on `Annotated[str | None, ...]` (Type not yet supported); a
    ruff fix once rewrote every Optional so."""
    for path in (PACKAGE / "cli").glob("*.py"):
        assert re.search(r"Annotated\[[^,\]]*\| None", path.read_text()) is None, path.name


def test_config_imports_only_leaf_modules_of_ours():
    assert _imports("config") <= {"errors", "files"}


def test_commands_that_do_not_compile_start_without_torchs_compiler_or_torchvision():
    """Loading torch._dynamo (and torchvision, which loads it) added seconds to every command's start."""
    import subprocess
    import sys

    modules = ["glowtrain.cli", "glowtrain.api", "glowtrain.sample", "glowtrain.score", "glowtrain.analysis",
               "glowtrain.evaluation", "glowtrain.checkpoint"]
    probe = (f"import sys\nfor name in {modules!r}: __import__(name)\n"
             "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'torchvision') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_model_code_widens_through_widest_float_never_to_float64_directly():
    """MPS has no float64: `.double()` on a parameter failed there (the plain 1x1 conv's slogdet); widest_float
    gives float32 on MPS and float64 elsewhere."""
    for module in ("flows", "model", "reversible", "splines", "dequantization", "objective", "losses"):
        source = (PACKAGE / f"{module}.py").read_text()
        assert ".double()" not in source, module
