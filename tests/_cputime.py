"""CPU seconds per test: this process plus the children it waited for.

On a busy machine wall-clock durations say more about the neighbours than about the test; the
CPU time a test costs does not. ``EXPLORER_TEST_CPU=N`` (or ``--cpu-top N``) prints the N tests
that cost the most CPU seconds and the total at the end of the run; on 2 cores the total over 2
bounds the wall time from below. Fixture set-up is counted with the test that triggers it.
Children are counted once they have been waited for (``subprocess.run``, ``Popen.wait``); a
server process killed at the end of a module is counted where it is reaped. With xdist each
worker keeps its own account and the controller sums what the workers report.
"""

from __future__ import annotations

import os
import resource

import pytest


def _cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def pytest_addoption(parser):
    parser.addoption("--cpu-top", type=int, default=None, metavar="N",
                     help="print the N tests that used the most CPU seconds (self + waited-for "
                          "children) and the total; default from EXPLORER_TEST_CPU, 0 = off")


class CpuTimes:
    def __init__(self, top: int):
        self.top = top
        self.per_test: dict[str, float] = {}
        self.start = _cpu()
        self.controller = False
        self._t0 = 0.0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._t0 = _cpu()
        yield
        if not self.controller:
            self.per_test[item.nodeid] = self.per_test.get(item.nodeid, 0.0) + _cpu() - self._t0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        if call.when == "teardown":  # carries the figure to the xdist controller
            outcome.get_result().user_properties.append(("cpu_s", _cpu() - self._t0))

    def pytest_runtest_logreport(self, report):
        # on the xdist controller: the workers' reports carry their tests' CPU seconds
        if report.when == "teardown" and hasattr(report, "node"):
            self.controller = True
            s = dict(report.user_properties).get("cpu_s", 0.0)
            self.per_test[report.nodeid] = self.per_test.get(report.nodeid, 0.0) + s

    def pytest_terminal_summary(self, terminalreporter):
        tr = terminalreporter
        total = _cpu() - self.start
        tr.write_sep("=", f"top {self.top} tests by CPU seconds (self + waited-for children)")
        for nodeid, s in sorted(self.per_test.items(), key=lambda kv: -kv[1])[: self.top]:
            tr.write_line(f"{s:8.2f}s  {nodeid}")
        tr.write_line(f"sum over tests: {sum(self.per_test.values()):.1f} CPU s; "
                      f"this process + children: {total:.1f} CPU s")


def pytest_configure(config):
    top = config.getoption("--cpu-top")
    if top is None:
        top = int(os.environ.get("EXPLORER_TEST_CPU", "0") or 0)
    if top > 0:
        config.pluginmanager.register(CpuTimes(top), "explorer-cputime")
