"""Configuration: TOML overlaid with BROKER_* variables; errors name the key and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import ConfigError, load_config


def test_defaults_need_no_file_and_no_environment() -> None:
    config = load_config(environ={})
    assert config.database.url is None  # the embedded PostgreSQL
    assert config.server.port == 8080
    assert config.public_url == "http://127.0.0.1:8080"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    file = tmp_path / "broker.toml"
    file.write_text('[server]\nport = 9000\npublic_url = "https://broker.example.org/"\n')
    config = load_config(
        file,
        environ={"BROKER_SERVER__PORT": "9100", "BROKER_DATABASE_URL": "postgresql://db/broker"},
    )
    assert config.server.port == 9100
    assert config.database.url == "postgresql://db/broker"
    assert config.public_url == "https://broker.example.org"


def test_broker_config_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "b.toml"
    file.write_text('[database]\ndata_dir = "/srv/broker"\n')
    assert load_config(environ={"BROKER_CONFIG": str(file)}).database.data_dir == Path(
        "/srv/broker"
    )
    assert load_config(environ={"BROKER_DATA_DIR": "/x"}).database.data_dir == Path("/x")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"BROKER_SERVER__PORT": "eighty"}, "server.port (env BROKER_SERVER__PORT)"),
        (
            {"BROKER_SERVER__PORTT": "1"},
            "server.portt (env BROKER_SERVER__PORTT): remove it or check its spelling",
        ),
        ({"BROKER_DATABASE_URL": "mysql://x"}, "must be a postgresql:// URL"),
        ({"BROKER_PORT": "1"}, "use BROKER_SECTION__KEY"),
    ],
)
def test_bad_settings_are_refused_naming_the_key_and_the_fix(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ=environ)
    assert message in str(caught.value)


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken, environ={})
