"""CLI start-up: ``--help``, ``--version`` and config errors answer without importing JAX (a lazy package root and
plain name lists for config validation); the lazy root still gives every public name. Wall times are printed
(``pytest -s``), never asserted."""

import json
import os
import subprocess
import sys
import time

import pytest

import jbptt
from jbptt import names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")

# Runs the CLI in a fresh interpreter and reports its exit code and whether JAX (or the library) got imported.
PROBE = """
import json, sys
from jbptt import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "jax": "jax" in sys.modules, "cells": "jbptt.cells" in sys.modules}))
"""


def _python(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
                         **kwargs)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("argv,code,message", [
    (["--help"], 0, "usage: jbptt"),
    (["--version"], 0, "jbptt "),
    (["run", "--help"], 0, "--print-config"),
    (["sample", "--help"], 0, "--temperature"),
    (["plot", "--help"], 0, "--metric"),
    (["sweep", "--help"], 0, "--parallel"),
    (["run", QUICKSTART, "optimizer.lr=abc"], 2, "optimizer.lr: expected float"),
    (["run", QUICKSTART, "optimizer.nope=1"], 2, "optimizer.nope: unknown key"),
    (["run", QUICKSTART, "model.cell=nope"], 2, "unknown cell 'nope'"),
    (["run", QUICKSTART, "task.name=nope"], 2, "unknown task 'nope'"),
    (["run", "missing.yaml"], 2, "file not found"),
    (["run", QUICKSTART, "--print-config"], 0, "task:"),
])
def test_cli_answers_without_importing_jax(argv, code, message):
    out, wall = _python("-c", PROBE, *argv)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"jbptt {' '.join(argv)}: {wall:.2f} s")
    assert result["code"] == code, out.stderr
    assert message in out.stdout + out.stderr
    assert not result["jax"] and not result["cells"], f"jbptt {argv} imported JAX"


def test_help_import_time():
    """``python -X importtime -m jbptt --help``: nothing of JAX; prints the wall time and the slowest imports."""
    out, wall = _python("-X", "importtime", "-m", "jbptt", "--help")
    assert out.returncode == 0 and "usage: jbptt" in out.stdout
    rows = [line.split("|") for line in out.stderr.splitlines() if line.startswith("import time:") and "|" in line]
    modules = [(int(r[1]), r[2].strip()) for r in rows if r[1].strip().isdigit()]
    assert modules and not [m for _, m in modules if m.split(".")[0] in ("jax", "jaxlib", "numpy", "optax")]
    slowest = ", ".join(f"{m} {t / 1e3:.0f} ms" for t, m in sorted(modules, reverse=True)[:3])
    print(f"jbptt --help: {wall:.2f} s wall; slowest imports (cumulative): {slowest}")


def test_name_lists_equal_the_registries():
    from jbptt.cells import CELLS
    from jbptt.tasks import TASKS

    assert names.CELL_NAMES == tuple(sorted(CELLS)), "a cell was added: name it in jbptt/names.py"
    assert names.TASK_NAMES == tuple(sorted(TASKS)), "a task was added: name it in jbptt/names.py"


def test_validation_honours_tasks_registered_at_run_time():
    from jbptt.experiment.config import ConfigError, parse_config
    from jbptt.tasks import TASKS, register_task

    with pytest.raises(ConfigError, match="unknown task 'my_task'"):
        parse_config({"task": {"name": "my_task"}})
    register_task("my_task")(lambda: None)
    try:
        assert parse_config({"task": {"name": "my_task"}}).task.name == "my_task"
    finally:
        del TASKS["my_task"]


LAZY = """
import json, sys
import jbptt
loaded = "jax" in sys.modules
listed = dir(jbptt)
import jbptt.experiment.build  # what `jbptt run` builds with: make_estimator must find every estimator
from jbptt.estimator import ESTIMATORS
registered = sorted(ESTIMATORS)
rtrl_name = jbptt.rtrl.__name__
from jbptt import *  # noqa
print(json.dumps({"loaded": loaded, "dir": listed, "rtrl": rtrl_name, "estimators": registered,
                  "star": sorted(n for n in jbptt.__all__ if n in globals())}))
"""


def test_the_package_root_is_lazy_but_complete():
    out, _ = _python("-c", LAZY)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert not result["loaded"]  # `import jbptt` alone imports nothing heavy
    assert result["rtrl"] == "jbptt.estimators.rtrl"
    assert {"bptt", "rtrl", "tbptt", "snap1", "uoro"} <= set(result["estimators"])  # registered for the runner
    assert result["star"] == sorted(jbptt.__all__)
    public = [n for n in result["dir"] if not n.startswith("__")]
    assert public == sorted(jbptt.__all__) and "__version__" in result["dir"]
    assert [getattr(jbptt, n) for n in jbptt.__all__]  # every public name resolves
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        jbptt.nope  # noqa: B018
