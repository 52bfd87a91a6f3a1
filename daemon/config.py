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
from daemon.worker.routing import AnalysisSettings

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
    #: Jobs each worker process runs at once, each in its own thread: the frames of concurrent
    #: analyses share forward passes (``analysis.max_batch``), so many small studies keep the
    #: model busy. 1: one job at a time.
    jobs_per_worker: int = Field(default=4, ge=1, le=32)
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


#: A destination's name: how rows, logs and ``usfmd outbox`` refer to it.
DestinationName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class DestinationTLS(_Section):
    """DICOM TLS towards a destination (PS3.15 Annex B.9): usfmd is the client."""

    enabled: bool = False
    #: CA bundle the destination's certificate must chain to; None: the system trust store.
    ca_certificates: Path | None = None
    #: Our client certificate and key, for destinations that require one (both or neither).
    certificate: Path | None = None
    private_key: Path | None = None
    #: Name the destination's certificate must carry; defaults to its ``host``.
    server_name: str | None = None

    @model_validator(mode="after")
    def _files_present(self) -> DestinationTLS:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("tls.certificate and tls.private_key go together (client certificate)")
        if self.enabled:
            for name in ("ca_certificates", "certificate", "private_key"):
                path = getattr(self, name)
                if path is not None and not path.is_file():
                    raise ValueError(f"tls.{name}: file {str(path)!r} does not exist")
        return self


class Destination(_Section):
    """A Storage SCP that receives usfmd's results (a PACS, a viewer, a test peer)."""

    name: DestinationName
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    #: At most this many simultaneous associations to it, over all usfmd processes and hosts.
    max_associations: int = Field(default=2, ge=1, le=32)
    #: False: results are still queued for it, but not sent until it is enabled again.
    enabled: bool = True
    tls: DestinationTLS = DestinationTLS()


class DispatchSettings(_Section):
    """The outbox and its C-STORE dispatcher: results back to the PACS."""

    #: ``usfmd serve`` runs a dispatcher (``usfmd worker --dispatch`` runs one on other hosts).
    enabled: bool = True
    destinations: tuple[Destination, ...] = ()
    #: After this many attempts an object is dead for that destination, with its last error.
    max_attempts: int = Field(default=8, ge=1)
    #: Retry back-off: base × 2^(attempt−1), capped.
    backoff_base_seconds: float = Field(default=30, ge=0)
    backoff_max_seconds: float = Field(default=3600, ge=0)
    #: Objects sent on one association before it is released.
    batch_size: int = Field(default=16, ge=1, le=50)
    #: A claimed batch belongs to its association this long; renewed after every object.
    lease_seconds: float = Field(default=300, gt=0)
    #: How often the outbox is checked for due objects.
    poll_seconds: float = Field(default=1.0, gt=0)
    connect_timeout: float = Field(default=10, gt=0)
    acse_timeout: float = Field(default=30, gt=0)
    dimse_timeout: float = Field(default=60, gt=0)
    network_timeout: float = Field(default=60, gt=0)
    #: SIGTERM: how long open associations may go on before they are aborted.
    drain_seconds: float = Field(default=30, ge=0)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: tuple[Destination, ...]) -> tuple[Destination, ...]:
        names = [d.name for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"destination name {name!r} is used twice")
        return value

    @model_validator(mode="after")
    def _lease_outlasts_one_object(self) -> DispatchSettings:
        needed = self.connect_timeout + self.acse_timeout + self.dimse_timeout
        if self.lease_seconds <= needed:
            raise ValueError(
                f"dispatch.lease_seconds ({self.lease_seconds}) must exceed connect + ACSE + "
                f"DIMSE timeouts ({needed}) or a slow send loses its lease mid-object"
            )
        return self

    def destination(self, name: str) -> Destination | None:
        return next((d for d in self.destinations if d.name == name), None)


class ModelsSettings(_Section):
    """The model registry's runtime side: where workers run models and how they notice updates."""

    #: A worker checks which version of a task is active at most this often (hot reload).
    reload_seconds: float = Field(default=10, gt=0)
    #: "auto": CUDA when torch sees a GPU, else CPU; "cuda" without a GPU is an error.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: bf16 autocast: "auto" where the hardware has native bf16 (AVX-512 BF16/AMX, CUDA sm80+).
    bf16: Literal["auto"] | bool = "auto"
    #: Run models through torch.compile (inductor, weights frozen): ViT-B/16 under bf16 on CPU
    #: ~1.1x faster with AVX512_BF16, ~1.3-1.5x with AMX. Needs a C++ compiler (gcc) on the
    #: worker hosts; each worker process compiles when it loads a model (about a minute on two
    #: cores), before it takes frames.
    compile: bool = False


class ScrubBand(_Section):
    """A scanner's burned-in patient strip: rows ``[0, rows)`` of every frame it sends."""

    #: Manufacturer (0008,0070), compared case-insensitively.
    manufacturer: str = Field(min_length=1)
    #: Manufacturer's Model Name (0008,1090); None: every model of the manufacturer.
    model: str | None = None
    rows: int = Field(ge=0)


class InpaintSettings(_Section):
    """Annotation removal (pipelines/inpaint): the papers' HSV mask, dilation, closing and
    Navier–Stokes fill, plus the detector of white / pale-yellow calipers and text."""

    #: Saturation cut = mean + k·std of the lit pixels' saturation, clipped to floor..ceiling.
    saturation_k: float = Field(default=3.0, ge=0)
    saturation_floor: int = Field(default=60, ge=0, le=255)
    saturation_ceiling: int = Field(default=128, ge=0, le=255)
    #: Pixels darker than this (HSV value) are ignored by the colour mask.
    value_floor: int = Field(default=50, ge=0, le=255)
    #: Keep solid colour areas of at least this many pixels (colour Doppler); None: mask all.
    colour_flow_min_area: int | None = Field(default=None, ge=1)
    #: Also detect white / pale-yellow strokes and dotted lines on grey images.
    bright_marks: bool = True
    bright_threshold: int = Field(default=190, ge=0, le=255)
    background_kernel: int = Field(default=9, ge=1)
    contrast: int = Field(default=40, ge=1, le=255)
    max_stroke_width: int = Field(default=2, ge=1)
    run_length: int = Field(default=5, ge=2)
    run_tolerance: int = Field(default=4, ge=0, le=255)
    group_kernel: int = Field(default=5, ge=1)
    colour_tolerance: int = Field(default=12, ge=0, le=255)
    min_anchor_share: float = Field(default=0.5, ge=0, le=1)
    dot_max_pixels: int = Field(default=4, ge=1)
    dot_chain_kernel: int = Field(default=7, ge=3)
    dot_min_count: int = Field(default=4, ge=1)
    dot_min_extent: int = Field(default=20, ge=0)
    #: Dilation, then closing, of the mask (square kernels).
    dilate_kernel: int = Field(default=3, ge=1)
    close_kernel: int = Field(default=5, ge=1)
    #: Navier–Stokes inpainting radius (3 in the papers).
    radius: int = Field(default=3, ge=1, le=100)
    #: Frames that went through lossy compression (JPEG): stroke runs and groups allow this
    #: much brightness noise instead of one exact colour; 6 suits JPEG quality ≥ 95. None (the
    #: behaviour before the setting, which model files without it were trained with): the
    #: exact rules, which miss most white text and ticks on JPEG frames.
    lossy_tolerance: int | None = Field(default=6, ge=0, le=255)
    #: Also find caliper crosses by their shape ('+' with arms at least this long, at most
    #: max_stroke_width thick, one level), which finds them on bright bone too. None (the
    #: behaviour before the setting, which model files without it keep): no cross rule.
    caliper_arm: int | None = Field(default=4, ge=1, le=50)

    @model_validator(mode="after")
    def _consistent(self) -> InpaintSettings:
        if self.background_kernel % 2 == 0:
            raise ValueError(
                f"background_kernel={self.background_kernel}: expected an odd window size"
            )
        if self.saturation_floor > self.saturation_ceiling:
            raise ValueError(
                f"saturation_floor ({self.saturation_floor}) must not exceed "
                f"saturation_ceiling ({self.saturation_ceiling})"
            )
        if self.caliper_arm is not None and self.caliper_arm < self.max_stroke_width:
            raise ValueError(
                f"caliper_arm ({self.caliper_arm}) must be at least "
                f"max_stroke_width ({self.max_stroke_width})"
            )
        return self


class PipelineSettings(_Section):
    """The image stages every analysed frame goes through: scrub, then inpaint."""

    #: Burned-in patient strips per scanner; scanners not listed get the strip detected.
    scrub_bands: tuple[ScrubBand, ...] = ()
    #: Detect the strip of scanners not listed. Off: their frames fail unless the header says
    #: Burned In Annotation NO.
    detect_band: bool = True
    inpaint: InpaintSettings = InpaintSettings()
    #: Refuse frames whose inpainting mask covers more than this share of them (a colour-filled
    #: or tinted image the fill would largely invent): the instance fails, naming the frame.
    max_inpainted_fraction: float = Field(default=0.25, gt=0.0, le=1.0)

    @field_validator("scrub_bands")
    @classmethod
    def _one_band_per_scanner(cls, value: tuple[ScrubBand, ...]) -> tuple[ScrubBand, ...]:
        seen: set[tuple[str, str | None]] = set()
        for band in value:
            key = (band.manufacturer.strip().casefold(), (band.model or "").strip().casefold())
            if key in seen:
                raise ValueError(
                    f"scrub band for manufacturer {band.manufacturer!r} model {band.model!r} "
                    "listed twice"
                )
            seen.add(key)
        return value


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
    dispatch: DispatchSettings = DispatchSettings()
    models: ModelsSettings = ModelsSettings()
    pipeline: PipelineSettings = PipelineSettings()
    analysis: AnalysisSettings = AnalysisSettings()
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
