"""Configuration: defaults, secrets from the environment, and errors that name the key."""

from __future__ import annotations

import pytest

from bot.runtime.config import load_config
from bot.settings import ConfigError


def load(tmp_path, text: str, environ: dict | None = None):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(None, environ={})
    assert config.model.checkpoint == "HuggingFaceM4/idefics-9b-instruct"
    assert config.generation.max_new_tokens == 512 and not config.generation.do_sample
    assert not config.discord.enabled and not config.slack.enabled
    assert str(config.state.path) == "state/idefics-bot.sqlite3"


def test_the_example_config_is_valid_and_complete():
    from pathlib import Path

    example = Path(__file__).parent.parent / "config.example.toml"
    config = load_config(example, environ={})
    text = example.read_text()
    for section, model in config:
        for key in type(model).model_fields:
            name = type(model).model_fields[key].alias or key
            assert f"{name} =" in text or f"# {name} =" in text, f"[{section}] {name} is not documented in config.example.toml"


def test_secrets_come_from_the_environment_and_never_print(tmp_path):
    config = load(tmp_path, "", {"DISCORD_TOKEN": "hunter2-discord", "SLACK_BOT_TOKEN": "xoxb-hunter2", "SLACK_APP_TOKEN": "xapp-hunter2"})
    assert config.discord.enabled and config.slack.enabled
    assert config.discord.token.get_secret_value() == "hunter2-discord"
    assert "hunter2" not in repr(config) and "hunter2" not in str(config.model_dump())


def test_a_file_value_wins_over_the_environment(tmp_path):
    config = load(tmp_path, '[discord]\ntoken = "from-file"\n', {"DISCORD_TOKEN": "from-env"})
    assert config.discord.token.get_secret_value() == "from-file"


def test_http_mode_slack_needs_the_signing_secret_not_the_app_token(tmp_path):
    config = load(tmp_path, '[slack]\nmode = "http"\n', {"SLACK_BOT_TOKEN": "xoxb", "SLACK_SIGNING_SECRET": "s"})
    assert config.slack.enabled
    assert not load(tmp_path, '[slack]\nmode = "http"\n', {"SLACK_BOT_TOKEN": "xoxb"}).slack.enabled


@pytest.mark.parametrize(
    "text, message",
    [
        ('[model]\ndtype = "bf16"\n', r"\[model\] dtype: Input should be 'auto', 'bfloat16', 'float16' or 'float32' \(got 'bf16'\)"),
        ("[generation]\nmax_new_tokens = 0\n", r"\[generation\] max_new_tokens: Input should be greater than or equal to 1 \(got 0\)"),
        ("[modle]\ncheckpoint = 'x'\n", r"\[modle\] is not a section of the configuration, nor an installed adapter's"),
        ("[images]\nmax_byte = 5\n", r"\[images\] max_byte: unknown key"),
        ("[discord]\nenabled = true\n", r"\[discord\] is enabled but has no token: set token in this section, or DISCORD_TOKEN"),
        ('[slack]\nenabled = true\nbot_token = "x"\n', r"\[slack\] is enabled but has no app_token: set app_token in this section, or SLACK_APP_TOKEN"),
        ("[model\n", r"not valid TOML"),
        ("[discord]\ntoken = 12345\n", r"\[discord\] token: Input should be a valid string$"),
    ],
)
def test_errors_name_the_file_key_and_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as error:
        load(tmp_path, text)
    assert str(error.value).startswith(str(tmp_path / "config.toml"))
    assert "12345" not in str(error.value)


def test_a_missing_file_is_explained(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file. Copy config.example.toml"):
        load_config(tmp_path / "nope.toml", environ={})
