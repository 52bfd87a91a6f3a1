"""Configuration: defaults, TOML, USFMD_* overrides, and errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.aetitle import validate_ae_title
from daemon.config import load_settings
from daemon.errors import ConfigError


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("USFMD", "USFMD"),
        ("  US1 ", "US1"),  # PS3.5: leading/trailing spaces are not significant
        ("A" * 16, "A" * 16),
        ("STORE-SCP_1", "STORE-SCP_1"),
        ("WITH SPACE", "WITH SPACE"),
    ],
)
def test_valid_ae_titles(value: str, expected: str) -> None:
    assert validate_ae_title(value) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("A" * 17, "at most 16"),
        ("BACK\\SLASH", "backslash"),
        ("TAB\tX", "printable ASCII"),
        ("NEW\nLINE", "printable ASCII"),
        ("ÜMLAUT", "printable ASCII"),
        ("", "empty"),
        ("    ", "empty"),
    ],
)
def test_invalid_ae_titles(value: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        validate_ae_title(value)


def test_embedded_defaults() -> None:
    settings = load_settings()
    assert settings.dicom.ae_title == "USFMD"
    assert (settings.dicom.host, settings.dicom.port) == ("127.0.0.1", 11112)
    assert settings.dicom.accept_any_from_loopback is True
    assert settings.dicom.calling_aes == ()
    assert settings.storage.archive == Path("usfmd-data/archive")
    assert settings.database_url.startswith("sqlite:///")
    assert settings.database_url.endswith("usfmd-data/usfmd.db")


def test_toml_then_environment_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "usfmd.toml"
    config.write_text(
        '[dicom]\nae_title = "AI_NODE"\nport = 4242\n'
        '[[dicom.calling_aes]]\nae_title = "VOLUSON"\nhost = "10.1.2.3"\nstable_seconds = 5\n'
        "[study]\nstable_seconds = 30\n"
    )
    monkeypatch.setenv("USFMD_DICOM__PORT", "4343")
    settings = load_settings(config)
    assert settings.dicom.ae_title == "AI_NODE"
    assert settings.dicom.port == 4343  # the environment wins over the file
    assert settings.dicom.calling_aes[0].host == "10.1.2.3"
    assert settings.stable_seconds_for("VOLUSON") == 5
    assert settings.stable_seconds_for("OTHER") == 30


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[dicom]\nae_title = "FROM_ENV_FILE"\n')
    monkeypatch.setenv("USFMD_CONFIG", str(config))
    assert load_settings().dicom.ae_title == "FROM_ENV_FILE"


def test_list_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USFMD_DICOM__CALLING_AES", '[{"ae_title": "US1", "port": 104}]')
    (ae,) = load_settings().dicom.calling_aes
    assert (ae.ae_title, ae.port) == ("US1", 104)


@pytest.mark.parametrize(
    ("env", "value", "needle"),
    [
        ("USFMD_DICOM__PORT", "70000", "dicom.port"),
        ("USFMD_DICOM__AE_TITLE", "THIS_TITLE_IS_TOO_LONG", "dicom.ae_title"),
        ("USFMD_STUDY__STABLE_SECONDS", "-1", "study.stable_seconds"),
        ("USFMD_STORAGE__MIN_FREE_SPACE", "lots", "storage.min_free_space"),
        ("USFMD_LOGGING__LEVEL", "LOUD", "logging.level"),
        ("USFMD_PIPELINE__MAX_INPAINTED_FRACTION", "0", "pipeline.max_inpainted_fraction"),
        ("USFMD_PIPELINE__MAX_INPAINTED_FRACTION", "1.5", "pipeline.max_inpainted_fraction"),
        ("USFMD_DICOM__CALLING_AES", '[{"ae_title": "X", "host": "not-an-ip"}]', "host"),
    ],
)
def test_bad_values_name_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, needle: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings()


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[dicom]\nae_titel = "X"\n')
    with pytest.raises(ConfigError, match=r"dicom\.ae_titel.*Extra inputs"):
        load_settings(config)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[dicom\nport = 1\n")
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(broken)


def test_tls_requires_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USFMD_DICOM__TLS__ENABLED", "true")
    with pytest.raises(ConfigError, match=r"tls\.certificate is required"):
        load_settings()
    monkeypatch.setenv("USFMD_DICOM__TLS__CERTIFICATE", str(tmp_path / "missing.pem"))
    monkeypatch.setenv("USFMD_DICOM__TLS__PRIVATE_KEY", str(tmp_path / "missing.key"))
    monkeypatch.setenv("USFMD_DICOM__TLS__REQUIRE_CLIENT_CERTIFICATE", "false")
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings()


def test_duplicate_calling_ae_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USFMD_DICOM__CALLING_AES", '[{"ae_title": "A"}, {"ae_title": "A"}]')
    with pytest.raises(ConfigError, match="listed twice"):
        load_settings()


def test_database_password_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USFMD_DATABASE__URL", "postgresql+psycopg://u:hunter2@db/usfmd")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert "hunter2" in settings.database_url


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError):
        settings.dicom.port = 1  # type: ignore[misc]


def test_shipped_example_configuration_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "usfmd.example.toml"
    settings = load_settings(example)
    assert settings.dicom.port == 104 and settings.logging.json_format is True
    assert int(settings.storage.min_free_space) == 20 * 2**30
    assert settings.stable_seconds_for("VOLUSON_E10") == 30


def test_json_logging_switch_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USFMD_LOGGING__JSON", "true")
    assert load_settings().logging.json_format is True


def test_max_inpainted_fraction_reaches_the_clean_stage(monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon.worker.analyze import clean_params

    assert clean_params(load_settings().pipeline).max_inpainted_fraction == 0.25
    monkeypatch.setenv("USFMD_PIPELINE__MAX_INPAINTED_FRACTION", "0.4")
    assert clean_params(load_settings().pipeline).max_inpainted_fraction == 0.4
