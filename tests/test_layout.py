"""The layout's promises: every command the README and docs show loads and validates, and configs stay on top."""

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from onepfrac_jax import main as entry
from onepfrac_jax.config import STAGES
from onepfrac_jax.parallel import mesh
from onepfrac_jax.stages import generate

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LIBRARY = ("config.py", "files.py", "rundir.py", "inference.py", "parallel", "fractals", "data", "models", "train",
           "export")


def shown_commands() -> list[tuple[str, str]]:
    """(page:line, command) of every `main.py --config ...` command in README.md and docs/, continuations joined."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for match in re.finditer(r"main\.py (--config[= ]configs/\w+\.py[^`|#\n]*)", line):
                found.append((f"{page.name}:{start + 1}", match.group(1).strip()))
    return found


COMMANDS = shown_commands()


def test_the_pages_show_commands_of_every_stage():
    stages = {re.search(r"configs/(\w+)\.py", command).group(1) for _, command in COMMANDS}
    assert stages == set(STAGES), f"no command shown for {set(STAGES) - stages}"


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[where for where, _ in COMMANDS])
def test_a_shown_command_loads_and_validates(where, command, monkeypatch):
    """The config file and variant load, every `--config.key=value` applies, and the stage's validate() passes:
    what main.py checks before any work, without training. The commands are for the machines the docs name: the
    host-memory check (generate's fractaldb_21k holds 1.3 TiB) sees a host of 4 TiB."""
    for module in (generate, mesh):
        monkeypatch.setattr(module, "host_memory_bytes", lambda: 4 * 2**40)
    tokens, argv = shlex.split(command), []
    for k, token in enumerate(tokens):  # `--config X` and `--config.key X` take the next token as their value
        if token.startswith("--config"):
            name, _, value = token.partition("=") if "=" in token else (token, "", tokens[k + 1])
            argv.append(f"{name}={entry.resolve_config_path(value) if name == '--config' else value}")
    values, argv = flags.FlagValues(), ["main.py", *argv]
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    config = holder.value
    entry.stage_module(config.stage).validate(config)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({node.module, *(f"{node.module}.{alias.name}" for alias in node.names)})
    return names


def test_no_library_module_imports_a_config_or_a_stage():
    """lint-imports checks the layers it can see; configs/ is installed as onepfrac_jax.configs, which it cannot."""
    package = ROOT / "onepfrac_jax"
    files = [p for entry_ in LIBRARY for p in ([package / entry_] if entry_.endswith(".py")
                                               else sorted((package / entry_).rglob("*.py")))]
    assert len(files) > 30
    upward = {f"{p.relative_to(ROOT)} imports {name}" for p in files for name in _imports(p)
              if name.startswith(("onepfrac_jax.configs", "onepfrac_jax.stages"))}
    assert not upward


def test_the_install_lists_every_package():
    """pyproject.toml lists the packages (configs/ is mapped in from the top, which `find` cannot see): a package
    missing there would be missing from a non-editable install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "onepfrac_jax").rglob("__init__.py")}
    assert listed == found | {"onepfrac_jax.configs"}
