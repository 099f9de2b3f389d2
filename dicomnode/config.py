"""One typed settings object for the whole node: a file plus ``DICOMNODE_*`` environment overrides.

Usage (from ``cli`` only; nothing reads the environment at import time)::

    from dicomnode.config import load_settings
    settings = load_settings(Path("dicomnode.yaml"))   # or None: defaults + environment
    settings.dicom.port, settings.database_url_resolved(), settings.spool_dir

Precedence, highest first: environment variables, the file (YAML ``.yaml``/``.yml`` or TOML ``.toml``),
defaults. Environment variables are ``DICOMNODE_`` + the field path joined with ``__``, e.g.
``DICOMNODE_DICOM__PORT=104``, ``DICOMNODE_HTTP__HOST=0.0.0.0``; list/dict fields take JSON, e.g.
``DICOMNODE_DESTINATIONS='[{"kind": "dimse", "name": "pacs", "ae_title": "PACS", "host": "10.0.0.5",
"port": 104}]'``.

Any invalid value raises :class:`dicomnode.errors.ConfigError` whose one-line message names the field, e.g.
``config: dicom.port: Input should be a valid integer``. Unknown keys are errors too (typos never silently
fall back to defaults).

Sections (see ``dicomnode.example.yaml`` at the repository root for a documented example):
``data_dir``, ``database_url``, ``dicom``, ``http``, ``completion``, ``destinations``, ``delivery``,
``rules_file``, ``retention``, ``analysis``, ``workers``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from dicomnode import DEFAULT_EROSION_MM
from dicomnode.errors import ConfigError

__all__ = [
    "AllowedAE",
    "AnalysisSettings",
    "BasicAuth",
    "BearerAuth",
    "ClientTlsSettings",
    "CompletionSettings",
    "DeliverySettings",
    "Destination",
    "DicomSettings",
    "DicomTlsSettings",
    "DicomwebDestination",
    "DimseDestination",
    "HttpSettings",
    "HttpTlsSettings",
    "LoginThrottleSettings",
    "RetentionSettings",
    "Settings",
    "WorkerSettings",
    "format_validation_error",
    "load_settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 1-16 chars of the default repertoire, no "\"

DEFAULT_DISCLAIMER = (
    "Opportunistic screening estimate from routine CT, not a diagnostic DXA/QCT measurement. "
    "Not for clinical decision making without review."
)


def _check_ae(value: str) -> str:
    v = value.strip()
    if not v or not _AE_RE.match(v):
        raise ValueError("must be 1-16 printable characters without backslash")
    return v


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedAE(_Section):
    """A calling AE title allowed to associate, optionally pinned to a peer address (host name or IP)."""

    ae_title: str
    address: str | None = None

    _ae = field_validator("ae_title")(_check_ae)


class DicomTlsSettings(_Section):
    """The DICOM TLS listener (``dicom.tls``): PS3.15 Annex B, TLS 1.2+ with the BCP 195 cipher suites.

    It listens on its own ``port`` beside the plain one (``dicom.port``; set that to null for TLS only).
    """

    port: int = Field(ge=1, le=65535)
    #: PEM: our certificate (optionally followed by its intermediate CAs) and its private key.
    certificate: Path
    private_key: Path
    #: Password of an encrypted private key (better from the environment: DICOMNODE_DICOM__TLS__KEY_PASSWORD).
    key_password: SecretStr | None = None
    #: PEM CA certificates that client certificates must chain to. With it, a client certificate is asked
    #: for and verified when sent; ``require_client_certificate`` makes it mandatory (mutual TLS).
    ca_bundle: Path | None = None
    require_client_certificate: bool = False
    #: Seconds a client has to complete the TLS handshake.
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=300)

    @model_validator(mode="after")
    def _mutual(self) -> DicomTlsSettings:
        if self.require_client_certificate and self.ca_bundle is None:
            raise ValueError(
                "require_client_certificate needs a ca_bundle (the CAs client certificates chain to)"
            )
        return self


class DicomSettings(_Section):
    """The DICOM (DIMSE) listener."""

    ae_title: str = "DICOMNODE"
    #: The plain (unencrypted) DICOM port; null = no plain listener (TLS only, ``tls`` must be set).
    port: int | None = Field(11112, ge=1, le=65535)
    host: str = "127.0.0.1"
    #: A DICOM TLS listener beside (or instead of) the plain one; None = no TLS listener.
    tls: DicomTlsSettings | None = None
    #: Calling AE titles allowed to associate; empty = any calling AE is accepted.
    allowed_calling_aets: list[AllowedAE] = Field(default_factory=list)
    #: What to do with storage SOP classes other than CT/enhanced CT: "ignore" = accept and keep but never
    #: analyse, "refuse" = do not accept them in association negotiation.
    accept_other_storage_classes: Literal["ignore", "refuse"] = "ignore"
    #: Concurrent associations accepted (counted once the peer has sent its A-ASSOCIATE-RQ: a connection
    #: that never identifies holds no slot); more are rejected with "local limit exceeded" (transient).
    max_associations: int = Field(10, ge=1, le=1000)
    #: Concurrent associations accepted from one peer address (a PACS sending in parallel uses 2-8).
    max_associations_per_address: int = Field(8, ge=1, le=1000)
    #: Open connections from one address that have not yet been accepted as associations; more are closed
    #: at once (a peer that connects and says nothing, again and again).
    max_pending_connections_per_address: int = Field(32, ge=1, le=1000)
    #: Seconds a peer has to send its A-ASSOCIATE-RQ (and each association PDU) before it is dropped.
    acse_timeout_seconds: float = Field(10.0, gt=0, le=600)
    #: Seconds an established association may stay idle (or take for one PDU) before it is aborted.
    network_timeout_seconds: float = Field(30.0, gt=0, le=3600)
    #: Seconds to wait for a DIMSE message of an association in progress.
    dimse_timeout_seconds: float = Field(60.0, gt=0, le=3600)
    #: Maximum PDU length we receive (PS3.8 Maximum Length Received); a longer PDU aborts the association.
    max_pdu_bytes: int = Field(1 << 20, ge=4096, le=64 << 20)
    #: Refuse C-STORE (out of resources) when free space in data_dir drops below this.
    free_space_floor_mb: int = Field(1024, ge=0)
    #: Processes receiving C-STORE on the DICOM port(s), each with its own spool writer and group commit, so
    #: parallel associations are not serialised on one Python interpreter lock; ``auto`` = min(4, CPUs), but 1
    #: on a machine of 2 CPUs or fewer (one process was as fast as two or faster there in 7 of 8 benchmarks).
    #: 1 = receive inside the node's own process (no child processes). Several processes accept on the same
    #: listening socket(s) (plain and TLS), balanced by their number of open connections; association limits
    #: and metrics are shared (``docs/conformance.md``, "Several receiving processes").
    receive_processes: int | Literal["auto"] = "auto"
    #: What a success status (C-STORE 0x0000, a stored STOW-RS instance) promises the sender survives.
    #: ``power`` (default): a power loss or kernel crash too; the file data, its directory entry and the
    #: database record are flushed to the device before the answer (SQLite ``synchronous=FULL``). ``process``:
    #: a crash of the node's process (kill -9, OOM kill), not a power loss or kernel crash; the same write,
    #: rename and commit in the same order, but nothing is flushed (the recording SQLite connection uses
    #: ``synchronous=NORMAL`` in WAL mode; PostgreSQL commits are unchanged). After a power loss in
    #: ``process`` mode, instances answered in the last seconds before it may be missing or truncated while
    #: their senders hold them for delivered (``docs/conformance.md``, "Receiving").
    durability: Literal["power", "process"] = "power"

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("receive_processes")
    @classmethod
    def _processes(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 64:
            raise ValueError("must be 'auto' or a number of processes from 1 to 64")
        return value

    @property
    def receive_process_count(self) -> int:
        """``receive_processes`` resolved: ``auto`` = min(4, CPUs of this machine), 1 with 2 CPUs or fewer.

        On 2 cores the receiving processes compete with the node's analysis and with each other, and each of
        two commits about one instance at a time, paying its own directory flush and database commit: one
        process was as fast as two or faster in 7 of 8 runs of ``benchmarks/ingest.py`` (README).
        """
        if self.receive_processes == "auto":
            cpus = os.cpu_count() or 1
            return 1 if cpus <= 2 else min(4, cpus)
        return int(self.receive_processes)

    @property
    def flush_to_device(self) -> bool:
        """Whether received instances are flushed to the device before the answer (``durability: power``)."""
        return self.durability == "power"

    @model_validator(mode="after")
    def _listeners(self) -> DicomSettings:
        if self.port is None and self.tls is None:
            raise ValueError("no DICOM listener: set port (plain) or tls (with its port)")
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port must differ from the plain port {self.port}")
        return self

    @field_validator("allowed_calling_aets", mode="before")
    @classmethod
    def _plain_strings(cls, value: Any) -> Any:
        # Allow the short form ``allowed_calling_aets: [PACS, MODALITY1]``.
        if isinstance(value, list):
            return [{"ae_title": v} if isinstance(v, str) else v for v in value]
        return value

    def is_allowed(self, calling_aet: str, address: str | None = None) -> bool:
        """Whether ``calling_aet`` (from ``address``) may associate."""
        if not self.allowed_calling_aets:
            return True
        aet = calling_aet.strip()
        for allowed in self.allowed_calling_aets:
            if allowed.ae_title == aet and (allowed.address is None or allowed.address == address):
                return True
        return False


class LoginThrottleSettings(_Section):
    """Password guessing brake for the admin UI's login form and HTTP Basic (``http.login_throttle``).

    After ``max_failures`` failed log-ins for one user name (or ``max_failures_per_address`` from one client
    address) within ``window_seconds``, further attempts for that name (from that address) are refused with
    HTTP 429 for ``lockout_seconds``. Counters live in the memory of each node process (a restart forgets
    them; ``receive`` and ``work`` count separately).
    """

    #: Failed log-ins for one user name (existing or not) from one client address before that name is locked
    #: for that address (never for all addresses: a third party cannot lock a sender out); 0 = no limit.
    max_failures: int = Field(5, ge=0, le=10_000)
    #: Failed log-ins per client address (any user name) before it is locked; 0 = no limit per address.
    #: Higher than per name: several people may share one address (a terminal server, a NAT, a proxy).
    max_failures_per_address: int = Field(20, ge=0, le=100_000)
    #: Failures older than this are forgotten.
    window_seconds: float = Field(900.0, gt=0, le=7 * 86400)
    #: How long a locked name or address is refused.
    lockout_seconds: float = Field(900.0, gt=0, le=7 * 86400)


class HttpTlsSettings(_Section):
    """HTTPS for the HTTP listener (``http.tls``): the port then speaks HTTPS only (TLS 1.2+, BCP 195)."""

    #: PEM: our certificate (optionally followed by its intermediate CAs) and its private key.
    certificate: Path
    private_key: Path
    key_password: SecretStr | None = None


class HttpSettings(_Section):
    """The HTTP listener (admin UI, REST API, STOW-RS)."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    #: HTTPS on ``port`` (certificate and key); None = plain HTTP (loopback, or behind a TLS reverse proxy).
    tls: HttpTlsSettings | None = None
    #: Strict-Transport-Security max-age sent on HTTPS responses (also when a trusted reverse proxy says
    #: the request came over HTTPS); 0 = no header.
    hsts_seconds: int = Field(31_536_000, ge=0, le=2 * 31_536_000)
    #: Reverse proxies whose X-Forwarded-Proto / X-Forwarded-For headers are trusted (addresses or
    #: networks). Empty (the default): no header is trusted, every address rule (``stow_allow_addresses``,
    #: the login throttle) uses the TCP peer. A TLS reverse proxy must be listed so that sessions get Secure
    #: cookies and HSTS; only for a request whose TCP peer is listed does the client address it forwards
    #: replace the peer. Never list an address clients can connect from directly (they could claim any
    #: address), nor ``*``.
    forwarded_allow_ips: list[str] = Field(default_factory=list)
    #: Client addresses or networks (``10.0.0.5``, ``10.0.0.0/24``) allowed to store instances with STOW-RS
    #: (``POST /dicomweb/studies``) without credentials, for a PACS that cannot authenticate. Empty (the
    #: default): STOW-RS needs an ``admin`` or ``sender`` account. The TCP peer address is used, so list
    #: the PACS itself, not a proxy in front of the node.
    stow_allow_addresses: list[str] = Field(default_factory=list)
    #: Lockout after repeated failed log-ins (login form and HTTP Basic).
    login_throttle: LoginThrottleSettings = Field(default_factory=LoginThrottleSettings)
    #: Largest STOW-RS request body, MB: reading stops there and the request answers 413.
    stow_max_body_mb: int = Field(4096, ge=1, le=1_048_576)
    #: Largest single instance (multipart part) in a STOW-RS body, MB: a larger part stops the request with
    #: 413. The write path reads one instance into memory to check its header (about twice its size), so
    #: this bounds the memory one request can take; raise it for large Enhanced CT objects.
    stow_max_instance_mb: int = Field(128, ge=1, le=65_536)
    #: Seconds a session cookie stays valid after log-in (it also ends at log-out, on a password change,
    #: a role change or when the account is disabled).
    session_max_age_seconds: int = Field(12 * 3600, ge=60, le=30 * 86400)

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        import ipaddress

        for v in value:
            if v.strip() == "*":
                raise ValueError(
                    "'*' would trust X-Forwarded-For from any client; list the reverse proxies' addresses"
                )
            try:
                ipaddress.ip_network(v.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or network") from None
        return [v.strip() for v in value]

    @field_validator("stow_allow_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for v in value:
            try:
                ipaddress.ip_network(v.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or network") from None
        return [v.strip() for v in value]


class CompletionSettings(_Section):
    """When a received series counts as complete (no instance arrived for a while)."""

    series_quiet_seconds: float = Field(60.0, gt=0)
    study_quiet_seconds: float = Field(120.0, ge=0)
    #: Complete a series at the latest this long after its first instance, even if instances keep coming.
    max_wait_seconds: float = Field(3600.0, gt=0)


class BasicAuth(_Section):
    kind: Literal["basic"]
    username: str
    password: SecretStr


class BearerAuth(_Section):
    kind: Literal["bearer"]
    token: SecretStr


class ClientTlsSettings(_Section):
    """TLS towards a destination (``destinations[].tls``): DICOM TLS for ``dimse``, HTTPS for ``dicomweb``.

    The peer's certificate is verified (chain to ``ca_bundle`` or the system's CAs, validity dates, and its
    name unless ``check_hostname`` is false) before anything is sent.
    """

    #: PEM CA certificates the peer's certificate must chain to; None = the system's trusted CAs.
    ca_bundle: Path | None = None
    #: Our client certificate and key, for peers that require mutual TLS.
    certificate: Path | None = None
    private_key: Path | None = None
    key_password: SecretStr | None = None
    #: False accepts any certificate (testing only: it gives up the protection TLS exists for).
    verify: bool = True
    #: False accepts a trusted certificate issued for another name (DICOM peers often name the AE instead).
    check_hostname: bool = True
    #: The name expected in the peer's certificate (and sent as SNI); None = the destination's host.
    server_name: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> ClientTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class DimseDestination(_Section):
    """A C-STORE destination."""

    kind: Literal["dimse"]
    name: str = Field(min_length=1)
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    #: Our calling AE title towards this destination; None = ``dicom.ae_title``.
    calling_ae: str | None = None
    timeout_seconds: float = Field(30.0, gt=0)
    #: DICOM TLS towards this destination; None = plain DICOM.
    tls: ClientTlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae)

    @field_validator("calling_ae")
    @classmethod
    def _calling(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae(value)


class DicomwebDestination(_Section):
    """A STOW-RS destination; ``url`` is the DICOMweb service root (``.../studies`` is appended)."""

    kind: Literal["dicomweb"]
    name: str = Field(min_length=1)
    url: str
    auth: Annotated[BasicAuth | BearerAuth, Field(discriminator="kind")] | None = None
    timeout_seconds: float = Field(30.0, gt=0)
    #: Certificate checks for an https:// URL (a CA bundle, a client certificate); None = verified against
    #: the system's trusted CAs. https:// certificates are always verified unless ``tls.verify`` is false.
    tls: ClientTlsSettings | None = None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _https(self) -> DicomwebDestination:
        if self.tls is not None:
            if not self.url.lower().startswith("https://"):
                raise ValueError("tls settings need an https:// url")
            if self.tls.key_password is not None:
                raise ValueError(
                    "tls.key_password is not supported for DICOMweb (use an unencrypted key file)"
                )
            if not self.tls.check_hostname:
                raise ValueError("tls.check_hostname false is not supported for DICOMweb")
            if self.tls.server_name is not None:
                raise ValueError("tls.server_name is not supported for DICOMweb (the URL's host is checked)")
        return self


Destination = Annotated[DimseDestination | DicomwebDestination, Field(discriminator="kind")]


class DeliverySettings(_Section):
    """Retry policy for deliveries (transient failures only; permanent ones stop at once)."""

    max_attempts: int = Field(8, ge=1)
    backoff_base_seconds: float = Field(30.0, gt=0)
    backoff_max_seconds: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> DeliverySettings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_base_seconds")
        return self


class RetentionSettings(_Section):
    #: Received instances are removed from the spool this many days after their study finished (0 = never).
    spool_days: int = Field(30, ge=0)
    #: A job's result folder (SR, SC, PNG, result.json files) is removed this many days after the job and
    #: all its deliveries finished (0 = never). The database keeps the job, its result and its history;
    #: only a re-run can send that result again.
    results_days: int = Field(90, ge=0)


class AnalysisSettings(_Section):
    """Options passed to the analysis pipeline."""

    disclaimer: str = DEFAULT_DISCLAIMER
    #: Erosion of the vertebral-body mask (mm) before measuring trabecular bone
    #: (default ``dicomnode.DEFAULT_EROSION_MM``, the measurement engine's own default).
    erosion_mm: float = Field(DEFAULT_EROSION_MM, ge=0, le=20)
    #: Contrast-enhanced series: "offset" = subtract a phase-dependent HU offset and flag,
    #: "abstain" = report no category.
    contrast_policy: Literal["offset", "abstain"] = "offset"
    #: Analysis backend: "classical" (built in), or a model bundle as "bundle:PATH" / "both:PATH".
    backend: str = "classical"
    #: Finer choices read by the ML bundle loader (``kind`` or ``kind:PATH``); None = the pipeline's default.
    segmentation_backend: str | None = None
    bmd_estimator: str | None = None
    #: Knee-radiograph classifier bundle folder (``dicomnode train knee-xray``); None: knee radiographs are
    #: received and their jobs say "no model configured".
    knee_bundle: str | None = None
    #: Fusion bundle (``dicomnode train fusion``): with lab values of the patient within its window the CT or
    #: knee result (whichever image score the bundle was trained on) is also reported fused with them; None:
    #: the image result alone.
    fusion_bundle: str | None = None

    @field_validator("backend", "segmentation_backend", "bmd_estimator")
    @classmethod
    def _spec(cls, value: str | None) -> str | None:
        if value is None:
            return None
        kind, sep, rest = value.partition(":")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", kind.strip().lower()) or (sep and not rest.strip()):
            raise ValueError("must be a name (e.g. 'classical') or 'KIND:PATH' (e.g. 'bundle:models/x')")
        return value.strip()


class WorkerSettings(_Section):
    count: int = Field(1, ge=1, le=64)
    executor: Literal["local", "celery"] = "local"
    #: Celery broker (e.g. ``redis://127.0.0.1:6379/0``); required when executor is "celery".
    broker_url: str | None = None
    #: While a delivery is being sent it is reserved this long; after a crash it is sent again after that
    #: (``--delivery-lease`` overrides). Longer than the slowest transfer of one result to one destination.
    delivery_lease_seconds: float = Field(120.0, gt=0, le=86400)
    #: An ANALYSING job without heartbeat for this long goes back to PENDING (its worker, on another host,
    #: died; ``--stale-job`` overrides). Workers beat every few seconds, so this only needs to cover pauses.
    stale_job_seconds: float = Field(300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _broker(self) -> WorkerSettings:
        if self.executor == "celery" and not self.broker_url:
            raise ValueError("broker_url is required when executor is 'celery'")
        return self


class Settings(BaseSettings):
    """Every setting of the node. Build it with :func:`load_settings`, then pass it (or parts of it) in."""

    model_config = SettingsConfigDict(
        env_prefix="DICOMNODE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        case_sensitive=False,
    )

    #: Holds the SQLite database (unless database_url says otherwise) and the spool of received files.
    data_dir: Path = Path("./dicomnode-data")
    #: SQLAlchemy URL; None = SQLite file ``dicomnode.sqlite3`` inside data_dir.
    #: PostgreSQL: ``postgresql+psycopg://user@host:5432/dbname``.
    database_url: str | None = None
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    #: Routing rules (YAML); None = the rules shipped with dicomnode (``routing/default_rules.yaml``).
    rules_file: Path | None = None
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    workers: WorkerSettings = Field(default_factory=WorkerSettings)

    @field_validator("database_url")
    @classmethod
    def _db_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("must be a sqlite:// or postgresql+psycopg:// URL")
        return value

    @model_validator(mode="after")
    def _unique_destinations(self) -> Settings:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique, repeated: {', '.join(dupes)}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file content arrives as init kwargs; the environment must override it, so it comes first.
        return (_MappingEnvSource(settings_cls), init_settings)

    # -- derived values -------------------------------------------------------------------------------

    @property
    def spool_dir(self) -> Path:
        """Where received instances (and produced artefacts) are written."""
        return self.data_dir / "spool"

    def database_url_resolved(self) -> str:
        """``database_url``, or the SQLite file in ``data_dir`` when none is set."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'dicomnode.sqlite3').as_posix()}"

    def destination(self, name: str) -> DimseDestination | DicomwebDestination:
        """The destination called ``name``; ``KeyError`` when there is none."""
        for d in self.destinations:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def destination_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.destinations)


def format_validation_error(exc: ValidationError, prefix: str = "config") -> str:
    """One line naming each failing field: ``config: dicom.port: Input should be a valid integer``."""
    parts = []
    for err in exc.errors():
        loc = _format_loc(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown setting"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{prefix}: " + "; ".join(parts)


_DISCRIMINATOR_TAGS = {"dimse", "dicomweb", "basic", "bearer"}


def _format_loc(loc: tuple[int | str, ...] | Any) -> str:
    out = ""
    prev_int = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
            prev_int = True
            continue
        # Tagged unions insert the tag ("dimse") in the location; it is noise to a reader.
        if part in _DISCRIMINATOR_TAGS and (prev_int or (i > 0 and loc[i - 1] == "auth")):
            prev_int = False
            continue
        out += f".{part}" if out else str(part)
        prev_int = False
    return out


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            data: Any = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(s.strip() for s in first[:3])
        kind = "TOML" if path.suffix.lower() == ".toml" else "YAML"
        raise ConfigError(f"config: {path.name} is not valid {kind}: {detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path.name} must hold a mapping of settings at the top level")
    return data


def load_settings(path: Path | str | None = None, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, merge and validate the settings.

    Parameters
    ----------
    path
        YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; None = defaults (plus the environment).
        A relative ``data_dir`` / ``rules_file`` in the file is taken relative to the file's folder.
    environ
        Where to read ``DICOMNODE_*`` overrides from; None = ``os.environ`` (read now, not at import).

    Returns
    -------
    Settings
        The validated, frozen settings.

    Raises
    ------
    ConfigError
        The file is unreadable or a value is invalid; the message names the field.
    """
    data: dict[str, Any] = {}
    base: Path | None = None
    if path is not None:
        p = Path(path)
        data = _read_file(p)
        base = p.resolve().parent
    env = dict(os.environ) if environ is None else environ
    try:
        settings = _build(data, env)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    if base is not None:
        # Paths in a config file mean "next to the file", not "wherever the process was started".
        updates: dict[str, Any] = {}
        if "data_dir" in data and not settings.data_dir.is_absolute():
            updates["data_dir"] = base / settings.data_dir
        if "rules_file" in data and settings.rules_file is not None and not settings.rules_file.is_absolute():
            updates["rules_file"] = base / settings.rules_file
        updates.update(_tls_paths_from(settings, base))
        if updates:
            settings = settings.model_copy(update=updates)
    return settings


_TLS_PATH_FIELDS = ("certificate", "private_key", "ca_bundle")


def _rebase(model: BaseModel | None, base: Path) -> Any:
    """``model`` with its relative certificate paths taken relative to ``base`` (None when unchanged)."""
    if model is None:
        return None
    update = {}
    for name in _TLS_PATH_FIELDS:
        value = getattr(model, name, None)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = base / value
    return model.model_copy(update=update) if update else None


def _tls_paths_from(settings: Settings, base: Path) -> dict[str, Any]:
    # Certificate paths in a config file mean "next to the file", like data_dir and rules_file.
    updates: dict[str, Any] = {}
    dicom_tls = _rebase(settings.dicom.tls, base)
    if dicom_tls is not None:
        updates["dicom"] = settings.dicom.model_copy(update={"tls": dicom_tls})
    http_tls = _rebase(settings.http.tls, base)
    if http_tls is not None:
        updates["http"] = settings.http.model_copy(update={"tls": http_tls})
    destinations = []
    changed = False
    for dest in settings.destinations:
        tls = _rebase(dest.tls, base)
        changed = changed or tls is not None
        destinations.append(dest.model_copy(update={"tls": tls}) if tls is not None else dest)
    if changed:
        updates["destinations"] = destinations
    return updates


class _MappingEnvSource(EnvSettingsSource):
    """The environment source, reading a given mapping (the one :func:`load_settings` was handed)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = _ENVIRON.get()
        if env is None:
            return super()._load_env_vars()
        return {k.lower(): v for k, v in env.items() if k.upper().startswith("DICOMNODE_") and v != ""}


#: The environment of the :func:`load_settings` call in progress (a context variable: thread safe).
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("dicomnode_config_environ", default=None)


def _build(data: dict[str, Any], env: Mapping[str, str]) -> Settings:
    token = _ENVIRON.set(env)
    try:
        return Settings(**data)
    finally:
        _ENVIRON.reset(token)
