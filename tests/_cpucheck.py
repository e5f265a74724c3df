"""Both answers of the CPU check in one run (a pytest plugin, loaded by conftest.py).

``explorer.stages.models.cpu_runs_bf16`` answers "does this CPU run bfloat16 natively?";
``EXPLORER_CPU_BF16=0|1`` forces the answer. A test marked ``cpu_check`` runs once per answer,
``[cpu_bf16=0]`` and ``[cpu_bf16=1]``, with the variable set while it runs (and so in every
process it starts), beside every other test of the run: a machine of either kind proves both
answers, without a second pytest run. A module fixture that must be made under the answer its
test runs under uses :func:`cpu_check_forced` (test_pipeline's builds, for instance).
"""

from __future__ import annotations

import contextlib
import os

import pytest

from explorer.stages.models import CPU_BF16_ENV, cpu_runs_bf16

#: "0": no native bfloat16, "1": native
CPU_BF16_ANSWERS = ("0", "1")


def pytest_generate_tests(metafunc):
    """Tests marked ``cpu_check`` are parametrized over :data:`CPU_BF16_ANSWERS`; a test that
    parametrizes ``cpu_bf16`` itself (beside other parameters) is left as it is."""
    if "cpu_bf16" not in metafunc.fixturenames or not metafunc.definition.get_closest_marker(
            "cpu_check"):
        return
    if any("cpu_bf16" in str(m.args[0]) for m in metafunc.definition.iter_markers("parametrize")):
        return
    metafunc.parametrize("cpu_bf16", CPU_BF16_ANSWERS, indirect=True,
                         ids=[f"cpu_bf16={a}" for a in CPU_BF16_ANSWERS])


@pytest.fixture(autouse=True)
def cpu_bf16(request, monkeypatch) -> str | None:
    """This test's forced answer, "0" or "1", set as ``EXPLORER_CPU_BF16`` while it runs;
    ``None`` for a test not parametrized over it (the run's own setting applies)."""
    answer = getattr(request, "param", None)
    if answer is not None:
        monkeypatch.setenv(CPU_BF16_ENV, answer)
    return answer


def run_answer() -> str | None:
    """The run's own ``EXPLORER_CPU_BF16`` (``make test`` sets "0"), ``None`` when unset."""
    return os.environ.get(CPU_BF16_ENV) or None


@contextlib.contextmanager
def cpu_check_forced(answer: str | None):
    """``EXPLORER_CPU_BF16=answer`` inside the block (``None``: the run's own setting); yields
    the check's answer there, ``cpu_runs_bf16()``, a key for fixtures made per answer."""
    with pytest.MonkeyPatch.context() as mp:
        if answer is not None:
            mp.setenv(CPU_BF16_ENV, answer)
        yield cpu_runs_bf16()


def made_per_answer(make):
    """``get(answer)``: ``make()``'s result under the CPU check forced to ``answer`` ("0", "1";
    ``None``: the run's own setting), made once per answer of the check (for a module
    fixture of things the check changes, such as a build)."""
    made = {}

    def get(answer: str | None):
        with cpu_check_forced(answer) as native:
            if native not in made:
                made[native] = make()
        return made[native]

    return get
