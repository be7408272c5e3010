"""Faults found by using ``jbptt`` as a user would (issue 14): each one pinned by a test."""

import contextlib
import io
import os

import pytest

from jbptt import cli
from tests.runner_helpers import tiny_raw, write_config


def run_cli(*args):
    """``(exit code, stdout, stderr)`` of ``jbptt *args`` run in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("overrides, key", [
    (["optimizer.options.b1=abc"], "optimizer.options"),
    (["model.cell=lstm", "model.options.forget_bias=abc"], "model.options"),
    (["task.options.dtype=float16"], "task.options.dtype"),
])
def test_bad_option_values_are_config_errors_before_anything_is_written(tmp_path, overrides, key):
    root = tmp_path / "runs"
    config = write_config(tmp_path / "c.yaml", tiny_raw(root))
    code, out, err = run_cli("run", config, *overrides, "--quiet")
    assert code == 2, err
    assert "config error" in err and f": {key}: " in err and "Traceback" not in err
    assert "multiple values" not in err
    assert not os.path.exists(root)
