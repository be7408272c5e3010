"""Config parsing: every kind of error names the file and key path, exits 2 and writes nothing; overrides."""


import pytest
import yaml

from jbptt import cli
from jbptt.experiment.config import ConfigError, apply_overrides, dump_config, load_config, parse_config, parse_override
from tests.runner_helpers import tiny_raw, write_config

BAD = [
    ("unknown key", {"model": {"hiddn": 8}}, "model.hiddn", "unknown key"),
    ("unknown top-level key", {"optimiser": {"lr": 1.0}}, "optimiser", "unknown key"),
    ("wrong type", {"model": {"hidden": "big"}}, "model.hidden", "expected int"),
    ("wrong type bool", {"training": {"steps": True}}, "training.steps", "expected int"),
    ("missing field", {"task": {"options": {"length": 5}}}, "task.name", "required"),
    ("impossible value", {"training": {"steps": 0}}, "training.steps", "must be >= 1"),
    ("impossible lr", {"optimizer": {"lr": -1.0}}, "optimizer.lr", "must be > 0"),
    ("unknown optimizer", {"optimizer": {"name": "adamm"}}, "optimizer.name", "unknown optimizer"),
    ("unknown cell", {"model": {"cell": "lstn"}}, "model.cell", "unknown cell"),
    ("unknown task", {"task": {"name": "addding"}}, "task.name", "unknown task"),
    (
        "bad task option",
        {"task": {"name": "delayed_recall", "options": {"length": 5, "lag": 9}}},
        "task.options",
        "lag < length",
    ),
    (
        "unknown task option",
        {"task": {"name": "adding", "options": {"lenght": 5}}},
        "task.options",
        "no option",
    ),
    ("bad cell option", {"model": {"options": {"activaton": "relu"}}}, "model.options", "activaton"),
    ("unknown estimator", {"estimator": {"name": "bptx"}}, "estimator.name", "unknown estimator"),
    ("bad estimator option", {"estimator": {"options": {"k9": 1}}}, "estimator.options", "k9"),
    ("esn on lstm", {"estimator": {"name": "esn"}}, "estimator.name", "model.cell: esn"),
    ("bad nan policy", {"training": {"on_nan": "ignore"}}, "training.on_nan", "halt"),
    ("bad parallel", {"parallel": {"mode": "dp"}}, "parallel.mode", "none, pmap or sharded"),
    ("warmup without steps", {"optimizer": {"schedule": "warmup"}}, "optimizer.warmup_steps", "warmup_steps"),
    ("bad fused", {"model": {"fused": "fast"}}, "model.fused", "auto, none or false"),
    ("fused option on a plain cell", {"model": {"fused": "none", "options": {"method": "vjp"}}}, "model.options",
     "method"),
]


@pytest.mark.parametrize("what,section,path,problem", BAD, ids=[b[0] for b in BAD])
def test_config_errors_exit_2_and_write_nothing(tmp_path, capsys, what, section, path, problem):
    root = tmp_path / "runs"
    raw = tiny_raw(root)
    for name, values in section.items():
        raw[name] = {**raw.get(name, {}), **values} if name in raw and name != "task" else values
    cfg_file = write_config(tmp_path / "bad.yaml", raw)
    code = cli.main(["run", cfg_file, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{cfg_file}: {path}: " in err and problem in err and err.count("\n") == 1, err
    assert not root.exists()


def test_bad_override_and_yaml(tmp_path, capsys):
    cfg_file = write_config(tmp_path / "c.yaml", tiny_raw(tmp_path / "runs"))
    assert cli.main(["run", cfg_file, "optimizer.lr=fast"]) == 2
    assert "optimizer.lr: expected float" in capsys.readouterr().err
    assert cli.main(["run", cfg_file, "model.hidden.size=3"]) == 2
    assert "model.hidden: is 8, not a section" in capsys.readouterr().err
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    assert cli.main(["run", str(tmp_path / "broken.yaml")]) == 2
    assert "invalid YAML" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_override_parsing():
    assert parse_override("optimizer.lr=3e-4") == (["optimizer", "lr"], "3e-4")  # YAML: a string...
    assert (
        parse_config({"task": {"name": "adding"}, "optimizer": {"lr": "3e-4"}}).optimizer.lr == 3e-4
    )  # ...a float
    assert parse_override("model.hidden=128") == (["model", "hidden"], 128)
    assert parse_override("training.patience=null") == (["training", "patience"], None)
    assert parse_override("estimator.options={k1: 10, k2: 20}") == (
        ["estimator", "options"],
        {"k1": 10, "k2": 20},
    )
    assert parse_override("logging.name=a=b") == (["logging", "name"], "a=b")
    raw = apply_overrides({"task": {"name": "adding"}}, ["estimator.options.k1=5", "task.options.length=7"])
    assert raw == {"task": {"name": "adding", "options": {"length": 7}}, "estimator": {"options": {"k1": 5}}}
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("optimizer.lr")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_raw(tmp_path)), ["optimizer.lr=2e-3"])
    assert cfg.optimizer.lr == 2e-3 and cfg.logging.name == "tiny" and cfg.training.patience is None
    (tmp_path / "resolved.yaml").write_text(dump_config(cfg))
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg
    assert yaml.safe_load(dump_config(cfg))["remat"] == {"policy": "none", "options": {}}


def test_open_remat_section():
    cfg = parse_config({"task": {"name": "adding"}, "remat": {"policy": "every_k", "k": 4}})
    assert cfg.remat.options == {"k": 4}


def test_model_fused_key_picks_the_cell_builder():
    """``model.fused: auto`` (the default) builds cells with their fused fast path, ``none``/``false`` plain ones."""
    from jbptt.experiment.build import build_cell

    def cell(**model):
        raw = {"task": {"name": "adding"}, "model": {"cell": "lstm", "hidden": 4, **model}}
        return build_cell(parse_config(raw), 1)

    assert parse_config({"task": {"name": "adding"}}).model.fused == "auto"
    assert cell().fused is not None and cell(layers=2).fused is not None
    assert cell(fused="none").fused is None and cell(fused=False).fused is None
    assert cell(cell="indrnn").fused is None  # no fused layer: the plain cell
