"""Typed configuration, read once from ``config.toml`` and passed down.

No other module reads the TOML file.  Every option, its default and the reason for the default
is documented in the shipped ``config.toml``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dicom_node.codes import OUTPUT_TRANSFER_SYNTAX_BY_NAME
from sr_engine.tasks import task_problem
from storage.rules import Rule


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or has an invalid value."""


_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")


def _check_ae(value: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or not _AE_RE.match(value) or "\\" in value:
        raise ConfigError(
            f"{where}: {value!r} is not a valid AE title (1-16 printable ASCII characters)"
        )
    return value.strip()


@dataclass
class TLSConfig:
    """DICOM TLS settings (PS3.15 B.1 / BCP 195) for the SCP or an SCU destination.

    Attributes
    ----------
    enabled
        Use TLS on this connection.
    cert_file, key_file
        This side's certificate chain and private key (PEM).
    ca_file
        CA bundle used to verify the peer.
    require_client_cert
        SCP only: demand and verify a client certificate (mutual TLS).
    check_hostname
        SCU only: verify the destination's host name against its certificate.
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""
    require_client_cert: bool = True
    check_hostname: bool = False


@dataclass
class NodeConfig:
    """``[node]``: identity, network policy and storage of this node."""

    ae_title: str = "SRNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage_dir: str = "./var/storage"
    database_url: str = "sqlite:///./var/srnode.db"
    require_called_ae_title: bool = True
    allowed_calling_ae_titles: list[str] = field(default_factory=list)
    allowed_hosts: dict[str, list[str]] = field(default_factory=dict)
    max_associations: int = 16
    max_pending_associations: int = 32
    max_pending_per_host: int = 8
    max_instance_mb: int = 512
    shutdown_grace_seconds: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = 1048576
    scp_engine: str = "srnode"
    min_free_disk_mb: int = 1024
    warn_free_disk_mb: int = 5120
    index_busy_timeout_seconds: float = 5.0
    log_level: str = "INFO"
    log_file: str = ""
    audit_log: str = "./var/audit.log"
    tls: TLSConfig = field(default_factory=TLSConfig)
    accept_all_storage: bool = True
    other_sop_classes: str = "store"


@dataclass
class SeriesConfig:
    """``[series]``: when a series counts as complete."""

    quiet_period_seconds: float = 20.0
    max_age_seconds: float = 3600.0
    check_interval_seconds: float = 5.0


@dataclass
class WorkerConfig:
    """``[worker]``: the processing loop and its retry policy."""

    enabled: bool = True
    poll_interval_seconds: float = 1.0
    max_attempts: int = 3
    backoff_base_seconds: float = 30.0
    backoff_max_seconds: float = 1800.0
    job_timeout_seconds: float = 1800.0
    lease_seconds: float = 120.0
    heartbeat_seconds: float = 15.0


@dataclass
class EngineConfig:
    """``[engine]``: how the SR engine runs."""

    device: str = "auto"
    batch_size: int = 8
    tile_size: int = 512
    tile_overlap: int = 16
    weights_dir: str = ""
    # "auto" (on in volume mode, off in slice mode), true or false: geometric self-ensemble.
    self_ensemble: str | bool = "auto"
    # Estimate each series' degradation, pick the weights made for it, or fall back to
    # interpolation when the estimate is uncertain or outside every trained family.
    estimate_degradation: bool = True
    # Volume mode: seconds of per-series self-supervised adaptation before inference (0 = off).
    adapt_seconds: float = 60.0
    # MB for the arrays of one slab (source slices, enhanced output, encoded instances) on top
    # of the process itself; the slab length follows from it and the matrix size.
    memory_budget_mb: float = 384.0

    def __post_init__(self) -> None:
        """Check ``self_ensemble`` and ``memory_budget_mb``."""
        if not self.memory_budget_mb > 0:
            raise ConfigError(f"[engine] memory_budget_mb must be positive, got "
                              f"{self.memory_budget_mb!r}")
        if not (self.self_ensemble == "auto" or isinstance(self.self_ensemble, bool)):
            raise ConfigError(f"[engine] self_ensemble: expected \"auto\", true or false, "
                              f"got {self.self_ensemble!r}")

    @property
    def self_ensemble_request(self) -> bool | None:
        """``EnhanceRequest.self_ensemble``: ``None`` for ``"auto"`` (the mode's default)."""
        return None if self.self_ensemble == "auto" else bool(self.self_ensemble)


@dataclass
class DerivedConfig:
    """``[derived]``: how derived series are named and encoded."""

    uid_root: str = ""
    series_number_offset: int = 1000
    series_description_prefix: str = "SR x{scale} "
    # used instead when the engine fell back to interpolation (the series is not SR output)
    interpolation_description_prefix: str = "INTERP x{scale} "
    manufacturer: str = "srnode project"
    institution_name: str = ""


@dataclass
class SafetyConfig:
    """``[safety]``: the consistency gate applied before a derived series is sent.

    ``max_abs_error`` bounds are in modality units of the re-degraded output against the input;
    ``min_psnr`` in dB.  Above ``warn_*`` the series is sent with ``(CHECK)`` in its description;
    above ``hold_*`` it is held as failed and never sent.
    """

    warn_mean_abs_error: float = 15.0
    hold_mean_abs_error: float = 60.0
    warn_min_psnr: float = 35.0
    hold_min_psnr: float = 25.0
    # When the engine used interpolation instead of the model (estimate not trusted, or no
    # weights safe for it; bicubic or a Lanczos-3 blend): "send" (the interpolated series,
    # labelled as such), "warn" (also "(CHECK)"), "hold", "skip" (no derived series; the job
    # is done and says why).
    on_fallback: str = "send"


@dataclass
class RetentionConfig:
    """``[retention]``: what the node deletes by itself (see ``storage.retention``)."""

    received_max_age_days: float = 0.0
    derived_max_age_days: float = 0.0
    delete_received_after_done: bool = False
    max_storage_gb: float = 0.0
    check_interval_seconds: float = 3600.0


@dataclass
class HttpConfig:
    """``[http]``: health, metrics, the web console and the REST API of ``srnode serve``."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""


@dataclass
class Destination:
    """``[[destinations]]``: a DICOM peer that receives derived series."""

    name: str
    ae_title: str
    host: str
    port: int
    transfer_syntax: str = "explicit"
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass
class Config:
    """The whole node configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    derived: DerivedConfig = field(default_factory=DerivedConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    destinations: list[Destination] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    path: Path | None = None
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    http: HttpConfig = field(default_factory=HttpConfig)

    def destination(self, name: str) -> Destination:
        """Return the destination called ``name``."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise ConfigError(f"unknown destination {name!r}")




def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ConfigError(f"[{where}]: unknown option(s) {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name == "tls":
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.tls] must be a table")
            kwargs[name] = _build(TLSConfig, value, f"{where}.tls")
            continue
        expected = str(known[name].type)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        checks = {
            "bool": (isinstance(value, bool), "true/false"),
            "int": (number and isinstance(value, int), "an integer"),
            "float": (number, "a number"),
            "str": (isinstance(value, str), "a string"),
            "list[str]": (isinstance(value, list) and all(isinstance(v, str) for v in value),
                          "a list of strings"),
            "dict[str, list[str]]": (
                isinstance(value, dict) and all(
                    isinstance(v, list) and all(isinstance(x, str) for x in v)
                    for v in value.values()),
                "a table of string lists"),
        }
        ok, what = checks.get(expected, (True, ""))
        if not ok:
            raise ConfigError(f"[{where}] {name}: expected {what}, got {value!r}")
        kwargs[name] = float(value) if expected == "float" else value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required option is missing
        raise ConfigError(f"[{where}]: {exc}") from exc


def _validate(cfg: Config) -> None:
    n = cfg.node
    n.ae_title = _check_ae(n.ae_title, "[node] ae_title")
    n.allowed_calling_ae_titles = [
        _check_ae(a, "[node] allowed_calling_ae_titles") for a in n.allowed_calling_ae_titles
    ]
    if not 0 <= n.port < 65536:
        raise ConfigError(f"[node] port: {n.port} is not a TCP port")
    if n.max_associations < 1:
        raise ConfigError("[node] max_associations must be >= 1")
    if n.max_pending_associations < 1 or n.max_pending_per_host < 1:
        raise ConfigError("[node] max_pending_associations and max_pending_per_host must be >= 1")
    if n.max_instance_mb < 0:
        raise ConfigError("[node] max_instance_mb must be >= 0 (0 = no limit)")
    if n.shutdown_grace_seconds < 0:
        raise ConfigError("[node] shutdown_grace_seconds must be >= 0")
    if not 0 < n.index_busy_timeout_seconds < n.dimse_timeout:
        raise ConfigError("[node] index_busy_timeout_seconds must be > 0 and < dimse_timeout")
    if n.max_pdu_size < 0:
        raise ConfigError("[node] max_pdu_size must be >= 0 (0 = unlimited)")
    if n.scp_engine not in ("srnode", "pynetdicom"):
        raise ConfigError(
            f"[node] scp_engine: {n.scp_engine!r} is not one of \"srnode\", \"pynetdicom\""
        )
    if n.other_sop_classes not in ("store", "discard"):
        raise ConfigError(
            f"[node] other_sop_classes: {n.other_sop_classes!r} is not one of \"store\", "
            "\"discard\""
        )
    if n.tls.enabled and not (n.tls.cert_file and n.tls.key_file):
        raise ConfigError("[node.tls] enabled needs cert_file and key_file")
    if n.warn_free_disk_mb < 0:
        raise ConfigError("[node] warn_free_disk_mb must be >= 0 (0 = no warning)")
    ret = cfg.retention
    for name in ("received_max_age_days", "derived_max_age_days", "max_storage_gb"):
        if getattr(ret, name) < 0:
            raise ConfigError(f"[retention] {name} must be >= 0 (0 = off)")
    if ret.check_interval_seconds <= 0:
        raise ConfigError("[retention] check_interval_seconds must be > 0")
    if not 0 <= cfg.http.port < 65536:
        raise ConfigError(f"[http] port: {cfg.http.port} is not a TCP port")
    if cfg.series.quiet_period_seconds <= 0:
        raise ConfigError("[series] quiet_period_seconds must be > 0")
    if cfg.safety.on_fallback not in ("send", "warn", "hold", "skip"):
        raise ConfigError(f"[safety] on_fallback: {cfg.safety.on_fallback!r} is not one of "
                          "\"send\", \"warn\", \"hold\", \"skip\"")
    if cfg.engine.adapt_seconds < 0:
        raise ConfigError("[engine] adapt_seconds must be >= 0")
    if cfg.worker.max_attempts < 1:
        raise ConfigError("[worker] max_attempts must be >= 1")
    names = set()
    for d in cfg.destinations:
        d.ae_title = _check_ae(d.ae_title, f"[[destinations]] {d.name} ae_title")
        if d.transfer_syntax not in OUTPUT_TRANSFER_SYNTAX_BY_NAME:
            raise ConfigError(
                f"[[destinations]] {d.name}: transfer_syntax must be one of "
                f"{tuple(OUTPUT_TRANSFER_SYNTAX_BY_NAME)}"
            )
        if d.name in names:
            raise ConfigError(f"[[destinations]] duplicate name {d.name!r}")
        names.add(d.name)
    for r in cfg.rules:
        problem = task_problem(r.mode, r.scale, r.model)
        if problem is not None:
            raise ConfigError(f"[[rules]] {r.name}: {problem}")
        for dest in r.destinations:
            if dest not in names:
                raise ConfigError(f"[[rules]] {r.name}: unknown destination {dest!r}")


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a validated :class:`Config` from parsed TOML.

    Raises
    ------
    ConfigError
        On unknown sections or options, wrong types or invalid values.
    """
    data = dict(data)
    known = {"node", "series", "worker", "engine", "derived", "safety", "destinations", "rules",
             "retention", "http"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
    cfg = Config(
        node=_build(NodeConfig, data.get("node", {}), "node"),
        series=_build(SeriesConfig, data.get("series", {}), "series"),
        worker=_build(WorkerConfig, data.get("worker", {}), "worker"),
        engine=_build(EngineConfig, data.get("engine", {}), "engine"),
        derived=_build(DerivedConfig, data.get("derived", {}), "derived"),
        safety=_build(SafetyConfig, data.get("safety", {}), "safety"),
        destinations=[
            _build(Destination, d, f"destinations.{i}")
            for i, d in enumerate(data.get("destinations", []))
        ],
        rules=[],
        path=path,
        retention=_build(RetentionConfig, data.get("retention", {}), "retention"),
        http=_build(HttpConfig, data.get("http", {}), "http"),
    )
    for i, r in enumerate(data.get("rules", [])):
        try:
            cfg.rules.append(Rule.from_mapping(r))
        except ValueError as exc:
            raise ConfigError(f"[[rules]] #{i + 1}: {exc}") from exc
    _validate(cfg)
    if path is not None:
        base = path.parent
        for section, attr in (("node", "storage_dir"), ("node", "audit_log"),
                              ("node", "log_file"), ("engine", "weights_dir")):
            obj = getattr(cfg, section)
            value = getattr(obj, attr)
            if value and not Path(value).is_absolute():
                setattr(obj, attr, str((base / value).resolve()))
        url = cfg.node.database_url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
            rel = url[len("sqlite:///"):]
            if rel and rel != ":memory:":
                cfg.node.database_url = "sqlite:///" + str((base / rel).resolve())
    return cfg


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate a TOML configuration file.

    Parameters
    ----------
    path
        The file; ``None`` means ``./config.toml`` (built-in defaults if it does not exist).
    """
    if path is None:
        p = Path("config.toml")
        if not p.exists():
            return parse_config({}, None)
    else:
        p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {p}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from exc
    return parse_config(data, p.resolve())
