"""Faults found by using ``jbptt`` as a user would (issue 14): each one pinned by a test."""

import contextlib
import io
import os

import pytest

from jbptt import cli
from jbptt.experiment.config import ConfigError, load_config
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


def test_a_duplicate_yaml_key_is_a_config_error_naming_the_key_and_file(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("task: {name: adding}\nmodel:\n  hidden: 8\n  cell: gru\n  hidden: 16\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "hidden" in str(e.value) and str(path) in str(e.value) and "duplicate" in str(e.value)
    assert "line 5" in str(e.value)
    path.write_text("task: {name: adding}\nmodel: {hidden: 8}\nmodel: {cell: gru}\n")
    code, _, err = run_cli("run", path)
    assert code == 2 and "duplicate key" in err and ": model: " in err
    path.write_text("task: {name: adding}\nmodel: {hidden: 8, cell: gru}\n")  # same key in two mappings: fine
    assert load_config(str(path)).model.hidden == 8
