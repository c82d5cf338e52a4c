"""Config precedence (defaults < YAML < CLI) and rejection of unknown keys and bad types."""

from dataclasses import dataclass, field

import pytest

from common.config import make_config, parse_config, run_main
from common.errors import UserError


@dataclass
class Cfg:
    model_name_or_path: str = field(default="models/base", metadata={"help": "base model"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    max_steps: int = field(default=10, metadata={"help": "steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16"})
    ratios: list[float] = field(default_factory=lambda: [0.5], metadata={"help": "replay ratios"})
    note: str | None = field(default=None, metadata={"help": "optional"})


def test_defaults_then_yaml_then_cli(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 0.001\nmax_steps: 50\nratios: [0, 0.25]\n")
    assert parse_config(Cfg, []).lr == 1e-4
    cfg = parse_config(Cfg, ["--config", str(y)])
    assert (cfg.lr, cfg.max_steps, cfg.ratios) == (0.001, 50, [0.0, 0.25])
    cfg = parse_config(Cfg, ["--config", str(y), "--max_steps", "7", "--bf16", "--ratios", "0.1", "0.9"])
    assert (cfg.lr, cfg.max_steps, cfg.bf16, cfg.ratios) == (0.001, 7, True, [0.1, 0.9])
    assert parse_config(Cfg, ["--bf16", "false", "--ratios", "0,0.5,1"]).ratios == [0.0, 0.5, 1.0]
    assert parse_config(Cfg, ["--note", "none"]).note is None


def test_unknown_keys_and_bad_types_rejected(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown config key.*learning_rate"):
        parse_config(Cfg, ["--config", str(y)])
    with pytest.raises(SystemExit):  # argparse: unknown flag
        parse_config(Cfg, ["--learning_rate", "0.1"])
    with pytest.raises(UserError, match="max_steps.*integer"):
        parse_config(Cfg, ["--max_steps", "ten"])
    with pytest.raises(UserError, match="bf16.*true/false"):
        make_config(Cfg, {"bf16": "maybe"})
    y.write_text("lr: [1, 2]\n")
    with pytest.raises(UserError, match="lr.*number"):
        parse_config(Cfg, ["--config", str(y)])
    y.write_text("lr: 0.1\n  bad: : yaml\n")
    with pytest.raises(UserError, match=r"c\.yaml:\d+: invalid YAML"):
        parse_config(Cfg, ["--config", str(y)])


def test_run_main_prints_one_line_error(tmp_path, capsys):
    def main(cfg):
        raise UserError(f"{cfg.model_name_or_path}: does not exist")

    with pytest.raises(SystemExit) as exc:
        run_main(main, Cfg, ["--model_name_or_path", "nowhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: nowhere: does not exist\n"
