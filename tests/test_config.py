"""Tests of valuerank.config on the shipped configs and on invalid variants of them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from valuerank.config import ConfigError, PipelineConfig, config_from_dict, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.toml"))
DEMO = CONFIG_DIR / "demo.toml"


def _demo_data() -> dict:
    return tomllib.loads(DEMO.read_text())


def test_configs_folder_has_files():
    names = {path.name for path in CONFIG_FILES}
    assert {"demo.toml", "kuairand.toml", "open_bandit.toml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_file_windows_parse(path):
    cfg = load_config(path)
    assert all(action.window_seconds > 0 for action in cfg.actions)


def test_demo_actions_in_order():
    cfg = load_config(DEMO)
    assert [a.name for a in cfg.actions] == ["click", "add_to_cart", "purchase", "report"]


def test_demo_value_weights():
    cfg = load_config(DEMO)
    assert {a.name: a.value_weight for a in cfg.actions} == {
        "click": 1.0,
        "add_to_cart": 2.0,
        "purchase": 10.0,
        "report": -50.0,
    }


def test_unknown_key_names_dotted_key():
    with pytest.raises(ConfigError, match=r"training\.epoch\b"):
        load_config(DEMO, overrides=["training.epoch=3"])


def test_unknown_key_in_list_names_index():
    data = _demo_data()
    data["actions"][1]["window"] = "1h"
    with pytest.raises(ConfigError, match=r"actions\[1\]\.window"):
        config_from_dict(data)


def test_invalid_literal_names_allowed_values():
    with pytest.raises(ConfigError) as error:
        load_config(DEMO, overrides=["training.device='tpu'"])
    message = str(error.value)
    assert "training.device" in message
    assert "'cpu'" in message
    assert "'cuda'" in message


def test_keep_rate_above_one_names_key():
    with pytest.raises(ConfigError, match=r"downsampling\.keep_rates\.negative"):
        load_config(DEMO, overrides=["downsampling.keep_rates.negative=1.5"])


def test_keep_rate_zero_names_key():
    with pytest.raises(ConfigError, match=r"downsampling\.keep_rates\.negative"):
        load_config(DEMO, overrides=["downsampling.keep_rates.negative=0.0"])


def test_keep_rate_one_is_valid():
    cfg = load_config(DEMO, overrides=["downsampling.keep_rates.negative=1.0"])
    assert cfg.downsampling.keep_rates == {"negative": 1.0}


def test_split_with_both_settings_rejected():
    with pytest.raises(ConfigError, match="exactly one of split.eval_start or split.eval_days"):
        load_config(DEMO, overrides=["split.eval_start='2024-03-15T00:00:00Z'"])


def test_split_with_neither_setting_rejected():
    data = _demo_data()
    del data["split"]
    with pytest.raises(ConfigError, match="exactly one of split.eval_start or split.eval_days"):
        config_from_dict(data)


def test_split_eval_start_alone_accepted():
    data = _demo_data()
    data["split"] = {"eval_start": "2024-03-15T00:00:00Z"}
    cfg = config_from_dict(data)
    assert cfg.split.eval_start_time.isoformat() == "2024-03-15T00:00:00+00:00"


def test_override_epochs():
    cfg = load_config(DEMO, overrides=["training.epochs=3"])
    assert cfg.training.epochs == 3


def test_override_leaves_file_value_elsewhere():
    cfg = load_config(DEMO, overrides=["training.epochs=3"])
    assert cfg.training.batch_size == 512


def test_error_names_config_file():
    with pytest.raises(ConfigError, match="demo.toml"):
        load_config(DEMO, overrides=["training.epoch=3"])
