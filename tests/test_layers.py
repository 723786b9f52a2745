"""The import-linter contracts stay complete and are checked (`lint-imports` runs in `make test`).

"Library code never imports a command module" lists modules one by one (`as_packages = false`), so a new module
would silently escape it: every module of the project must be either a command module (`engine.cli` or registered
in its COMMANDS) or listed as library code, and never both.
"""

import pkgutil
import tomllib
from importlib import import_module
from pathlib import Path

from engine.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "export", "benchmarks")


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert sorted(config["root_packages"]) == sorted(PACKAGES)
    return {c["name"]: c for c in config["contracts"]}


def _all_modules() -> set[str]:
    names = set()
    for top in PACKAGES:
        names.add(top)
        names.update(m.name for m in pkgutil.walk_packages(import_module(top).__path__, top + "."))
    return names


def test_every_module_is_a_command_or_listed_library_code():
    contract = _contracts()["Library code never imports a command module"]
    assert contract["as_packages"] is False
    library, commands = set(contract["source_modules"]), set(contract["forbidden_modules"])
    registered = {"engine.cli", *(module for module, _ in COMMANDS.values())}
    assert commands == registered, "the contract's command modules must be exactly engine.cli + its COMMANDS"
    assert not library & commands
    modules = _all_modules()
    unlisted = modules - library - commands
    assert not unlisted, f"add these modules to the contract's source_modules (library) or to COMMANDS: {unlisted}"
    assert not library - modules, f"the contract lists modules that do not exist: {library - modules}"


def test_reference_path_contract_names_the_fast_paths():
    forbidden = set(_contracts()["The reference path imports no fast path, export, live, training, evaluation or "
                                 "command code"]["forbidden_modules"])
    backends = {f"engine.backends.{m.name}" for m in pkgutil.iter_modules(import_module("engine.backends").__path__)}
    fast = backends - {"engine.backends.reference"}
    assert fast <= forbidden, f"fast backends missing from the reference-path contract: {fast - forbidden}"
    assert {"kernels", "export", "engine.live", "engine.training", "engine.cli"} <= forbidden
