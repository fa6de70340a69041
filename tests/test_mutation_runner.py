"""The mutation runner classifies outcomes correctly under the suite's own pytest settings.

A runner that reads every mutant as "error" (or "survived") would report nothing useful; this
happened once when the suite moved to pytest-xdist, under which ``-x`` ends a session as
"interrupted" (exit status 2).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_check",
                                                  ROOT / "scripts" / "mutation_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation_check"] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def test_a_listed_mutant_is_killed_and_an_identity_change_survives() -> None:
    runner = _runner()
    mutant = next(m for m in runner.MUTANTS if m.name == "gate-nan")
    killed = runner.run_mutant(mutant, timeout=300)
    assert killed["outcome"] == "killed", killed
    identity = dataclasses.replace(mutant, name="identity", replace=mutant.find)
    survived = runner.run_mutant(identity, timeout=300)
    assert survived["outcome"] == "survived", survived
