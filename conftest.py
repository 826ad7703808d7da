"""pytest hooks for the whole repository: each chapter's runtime under nbval, in the test summary.

The workbook promises every chapter runs top to bottom in about 3 minutes on a 2-core CPU; the
runtimes in the README were measured on one machine. Printing what each notebook took in this run
(`./run test`, and so in CI) measures it again wherever the tests run. Timings are reported,
never asserted.
"""

from collections import defaultdict

_NOTEBOOK_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::")[0]
    if path.endswith(".ipynb"):
        _NOTEBOOK_SECONDS[path] += report.duration  # setup, call and teardown of every cell


def pytest_terminal_summary(terminalreporter):
    if _NOTEBOOK_SECONDS:
        terminalreporter.section("notebook runtimes (nbval, this machine)")
        for path, seconds in sorted(_NOTEBOOK_SECONDS.items()):
            terminalreporter.write_line(f"{path}: {seconds:.0f} s")
