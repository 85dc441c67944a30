"""``trp.machine``: what a measurement ran on, and the allocator setting of the recipes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from trp.machine import ISA_VARIABLES, machine

_GLIBC = hasattr(os, "confstr") and bool(os.confstr("CS_GNU_LIBC_VERSION") or "")


def _run(code: str) -> str:
    # In a child: the setting lasts for the process that makes it.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt")
def test_keep_freed_memory_takes_effect_on_glibc() -> None:
    assert _run("from trp.machine import keep_freed_memory; print(keep_freed_memory())") == "True"


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt")
def test_recipes_setup_honours_keep_freed_memory() -> None:
    code = """
import trp.recipes.run as run
from trp.recipes import compose
calls = []
run.keep_freed_memory = lambda: calls.append(1) or True
run._setup(compose(["keep_freed_memory={value}"]))
print(len(calls))
"""
    assert _run(code.format(value="true")) == "1"
    assert _run(code.format(value="false")) == "0"


def test_machine_names_the_cpu_and_its_instruction_sets() -> None:
    facts = machine()
    assert {"cpu_model", "trp_cpu_capability", "aten_cpu_capability", "isa_limits"} <= set(facts)
    assert set(facts["isa_limits"]) <= set(ISA_VARIABLES)
