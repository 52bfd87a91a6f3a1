"""Typed, frozen configuration: one TOML file, every key overridable by a ``USFMD_*`` variable.

Precedence (highest first): environment (``USFMD_DICOM__PORT=11113``, nested keys joined by
``__``; lists as JSON), the TOML file (``--config`` or ``USFMD_CONFIG``), embedded defaults.
With no file at all the daemon runs on the defaults: SQLite and archive under ``./usfmd-data``,
AE title ``USFMD`` on 127.0.0.1:11112, any calling AE accepted from loopback only.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from daemon.aetitle import validate_ae_title
from daemon.errors import ConfigError

AETitle = Annotated[str, AfterValidator(validate_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]
ENV_PREFIX = "USFMD_"
CONFIG_ENV = "USFMD_CONFIG"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _validate_ip(value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return str(ipaddress.ip_address(value))
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not an IP address (host binding compares addresses)"
        ) from exc


class KnownAE(_Section):
    """A remote application entity allowed to associate (a modality, a PACS, a test tool)."""

    ae_title: AETitle
    #: Accept this AE title only from this address; None accepts it from any host.
    host: Annotated[str | None, AfterValidator(_validate_ip)] = None
    #: Where the peer listens, used to deliver Storage Commitment reports on a new association.
    port: Port | None = None
    #: Overrides ``study.stable_seconds`` for studies sent by this AE.
    stable_seconds: float | None = Field(default=None, gt=0)
    #: How to send the Storage Commitment N-EVENT-REPORT: on the requesting association
    #: ("same"), on a new one to ``port`` ("new"), or "auto": a new one when ``port`` is set
    #: (every SCU must accept that, PS3.4 J.3.3.1.3) with the requesting one as fallback,
    #: otherwise the requesting one while it is open.
    commitment_report: Literal["auto", "same", "new"] = "auto"
    #: Call this peer back (commitment reports) over TLS with ``dicom.tls``'s certificate,
    #: verifying the peer against ``dicom.tls.ca_certificates``.
    tls: bool = False


class TLSSettings(_Section):
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA bundle that client certificates must chain to.
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="after")
    def _files_present(self) -> TLSSettings:
        if not self.enabled:
            return self
        needed = {"certificate": self.certificate, "private_key": self.private_key}
        if self.require_client_certificate:
            needed["ca_certificates"] = self.ca_certificates
        for name, path in needed.items():
            if path is None:
                raise ValueError(f"tls.{name} is required when TLS is enabled")
            if not path.is_file():
                raise ValueError(f"tls.{name}: file {str(path)!r} does not exist")
        return self


class DicomSettings(_Section):
    ae_title: AETitle = "USFMD"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_associations: int = Field(default=16, ge=1, le=1000)
    #: Largest P-DATA PDU we accept (PS3.8 §9.3.1); 0 means no limit.
    max_pdu: int = Field(default=0, ge=0)
    acse_timeout: float = Field(default=30, gt=0)
    dimse_timeout: float = Field(default=60, gt=0)
    network_timeout: float = Field(default=60, gt=0)
    require_called_ae_title: bool = True
    #: Accept any calling AE title from 127.0.0.0/8 and ::1 (remote callers must be listed).
    accept_any_from_loopback: bool = True
    calling_aes: tuple[KnownAE, ...] = ()
    tls: TLSSettings = TLSSettings()

    @field_validator("calling_aes")
    @classmethod
    def _unique_titles(cls, value: tuple[KnownAE, ...]) -> tuple[KnownAE, ...]:
        seen: set[tuple[str, str | None]] = set()
        for ae in value:
            key = (ae.ae_title, ae.host)
            if key in seen:
                raise ValueError(f"calling AE {ae.ae_title!r} (host {ae.host}) listed twice")
            seen.add(key)
        return value

    @model_validator(mode="after")
    def _tls_callbacks_possible(self) -> DicomSettings:
        for ae in self.calling_aes:
            if ae.tls and (not self.tls.enabled or self.tls.ca_certificates is None):
                raise ValueError(
                    f"calling_aes {ae.ae_title!r} has tls = true: dicom.tls must be enabled "
                    "with ca_certificates to call it back over TLS"
                )
        return self


class StorageSettings(_Section):
    data_dir: Path = Path("usfmd-data")
    #: Defaults to ``<data_dir>/archive``.
    archive_dir: Path | None = None
    #: Defaults to ``<data_dir>/quarantine``.
    quarantine_dir: Path | None = None
    #: Refuse new instances (0xA700) when the archive's file system has less free space.
    min_free_space: ByteSize = ByteSize(1 << 30)

    @property
    def archive(self) -> Path:
        return self.archive_dir or self.data_dir / "archive"

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.data_dir / "quarantine"

    @property
    def incoming(self) -> Path:
        """Partial receives; on the archive's file system so that a rename is atomic."""
        return self.archive / ".incoming"


class DatabaseSettings(_Section):
    #: SQLAlchemy URL; defaults to SQLite at ``<data_dir>/usfmd.db``.
    #: PostgreSQL: ``postgresql+psycopg://user@host:5432/usfmd``.
    url: SecretStr | None = None
    pool_size: int = Field(default=10, ge=1)
    #: SQLite only: how long a writer waits for the lock before failing.
    busy_timeout_ms: int = Field(default=30000, ge=0)


class StudySettings(_Section):
    #: A study is complete after this many seconds without a new instance.
    stable_seconds: float = Field(default=60, gt=0)
    #: How often the scheduler looks for studies that became stable.
    sweep_interval_seconds: float = Field(default=2, gt=0)


class QueueSettings(_Section):
    """Job leases, retries and the local worker processes of ``usfmd serve``."""

    #: Local worker processes started by ``usfmd serve`` (0: receive only; run ``usfmd worker``).
    workers: int = Field(default=2, ge=0, le=64)
    #: A claimed job belongs to its worker for this long; heartbeats extend it.
    lease_seconds: float = Field(default=60, gt=0)
    heartbeat_seconds: float = Field(default=10, gt=0)
    #: After this many attempts a job is dead-lettered with its last error.
    max_attempts: int = Field(default=5, ge=1)
    #: Retry back-off: base × 2^(attempt−1), capped.
    backoff_base_seconds: float = Field(default=10, ge=0)
    backoff_max_seconds: float = Field(default=900, ge=0)
    #: How long an idle worker waits before looking for work again.
    poll_seconds: float = Field(default=0.5, gt=0)
    #: SIGTERM: how long a worker may finish its current job before releasing it.
    drain_seconds: float = Field(default=30, ge=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> QueueSettings:
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ValueError(
                f"queue.heartbeat_seconds ({self.heartbeat_seconds}) must be shorter than "
                f"queue.lease_seconds ({self.lease_seconds}) or leases expire while working"
            )
        return self


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_format: bool = Field(default=False, alias="json")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Settings(BaseSettings):
    """The whole configuration; build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
    )

    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    study: StudySettings = StudySettings()
    queue: QueueSettings = QueueSettings()
    logging: LoggingSettings = LoggingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is named in the model config of the subclass load_settings() makes.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def database_url(self) -> str:
        if self.database.url is not None:
            return self.database.url.get_secret_value()
        return f"sqlite:///{(self.storage.data_dir / 'usfmd.db').resolve()}"

    def stable_seconds_for(self, calling_ae: str | None) -> float:
        for ae in self.dicom.calling_aes:
            if ae.ae_title == calling_ae and ae.stable_seconds is not None:
                return ae.stable_seconds
        return self.study.stable_seconds


def settings_to_dict(settings: Settings) -> dict[str, Any]:
    """Plain values, secrets included, to hand the same configuration to a child process."""

    def reveal(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return value.get_secret_value()
        if isinstance(value, dict):
            return {k: reveal(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [reveal(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return dict(reveal(settings.model_dump(by_alias=True)))


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {error['msg']}{shown}"


def load_settings(path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read, merge and validate the configuration; raise :class:`ConfigError` naming each bad key.

    Parameters
    ----------
    path
        TOML file; when ``None`` the ``USFMD_CONFIG`` variable is consulted, and without it the
        embedded defaults apply.
    overrides
        Section values that win over everything (used by tests and the CLI).
    """
    if path is None and os.environ.get(CONFIG_ENV):
        path = os.environ[CONFIG_ENV]
    toml_path = Path(path) if path is not None else None
    if toml_path is not None and not toml_path.is_file():
        raise ConfigError(f"configuration file {str(toml_path)!r} does not exist")
    bound = type(
        "Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": toml_path}}
    )
    try:
        return bound(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors(include_url=False))
        origin = f" in {toml_path}" if toml_path else ""
        raise ConfigError(
            f"invalid configuration{origin} or {ENV_PREFIX}* environment: {problems}"
        ) from None
    except ValueError as exc:  # malformed TOML or JSON in an environment variable
        raise ConfigError(f"cannot read configuration: {exc}") from exc
