"""Orthanc-style configuration: read once at start-up, validated once, then immutable.

Users point accelerator at the configuration of a real Orthanc (spec section 11), so the file
format and option names are Orthanc's:

* JSON with `//` line comments and `/* */` block comments (never inside strings, so
  `"http://host"` survives);
* `${VAR}` and `${VAR:-default}` environment references, substituted in the *text* before JSON
  parsing as Orthanc does, so a reference outside quotes can become a number or a boolean
  (`"HttpPort": ${PORT:-8042}`). Inside quotes the variable's value is JSON-escaped (a Windows
  path with backslashes stays one string), while a default is copied as written (it is already
  JSON text). `:-` uses the default when the variable is unset *or empty*, like the shell. A
  reference without default to an unset variable is an error naming the variable and the key.
  References inside comments are ignored;
* a folder instead of a file means every `*.json` in it, sorted by name, merged at the top level;
  the same top-level key in two files is an error (Orthanc refuses it too).

Every option we use is validated here and nowhere else: an error names the key path and the
expected value (`Transfers.BucketSize: expected an integer >= 1, got 0`). Unknown keys are not
fatal, because a real Orthanc configuration carries many options we have no use for: those in
`IGNORED_ORTHANC_OPTIONS` are dropped silently, the others are returned in `Config.unknown_keys`
for the caller to warn about.

Object storage: the sections `AwsS3Storage` and `AzureBlobStorage` of Orthanc's object-storage
plugins (Orthanc book, "Cloud Object Storage plugins"), with the plugins' option names and
defaults, `HybridMode` inside the section as in the plugins. At most one of them may be present
(Orthanc loads one object-storage plugin); the result is `Config.object_storage`, an
`ObjectStorageConfig` (None without a section) from which the store builds its own settings. The
documented options we have no use for are validated and then left aside; a value we cannot honour
because it changes what is stored (client-side `StorageEncryption`) is refused. Secrets
(`SecretKey`, `ConnectionString`) never appear in `repr()` nor in error messages.

Our extensions to Orthanc's options: `HttpBindAddress` (address the HTTP server binds; "" means
all interfaces) and `MaximumRequestBodySize` (MiB; larger request bodies get HTTP 413).
`Transfers.MaxHttpRetries` defaults to 3 (the plugin's default is 0): over real links a single
dropped connection should not fail a whole transfer.

The defaults live only in the `_OPTIONS`, `_TRANSFERS_OPTIONS`, `_AWS_S3_OPTIONS` and
`_AZURE_BLOB_OPTIONS` tables below.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from protocol.errors import ConfigError
from protocol.limits import TransferLimits

__all__ = [
    "Config",
    "ObjectStorageConfig",
    "PostgreSQLConfig",
    "Peer",
    "TransfersConfig",
    "IGNORED_ORTHANC_OPTIONS",
    "DEFAULTS",
    "TRANSFERS_DEFAULTS",
    "AWS_S3_DEFAULTS",
    "AZURE_BLOB_DEFAULTS",
    "HYBRID_MODES",
    "load_config",
    "config_from_dict",
    "parse_config_text",
]


# --------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransfersConfig:
    """The `Transfers` section (spec 11.1); sizes in the units of the file, bytes via properties."""

    threads: int
    bucket_size: int  # KiB
    cache_size: int  # MiB
    max_push_transactions: int
    max_http_retries: int
    peer_connectivity_timeout: int  # seconds
    peer_commit_timeout: int  # seconds
    commit_threads_count: int
    skip_stored_instances: bool
    adaptive_bucket_size: bool
    push_transaction_timeout: int  # seconds without a request before a push transaction expires
    max_transfer_instances: int
    max_instance_size: int  # MiB
    max_transfer_size: int  # MiB
    negotiated_codecs: bool = True  # offer and use codecs beyond gzip with our own peers

    @property
    def bucket_size_bytes(self) -> int:
        return self.bucket_size * 1024

    @property
    def cache_size_bytes(self) -> int:
        return self.cache_size * 1024 * 1024

    @property
    def max_instance_bytes(self) -> int:
        return self.max_instance_size * 1024 * 1024

    @property
    def max_transfer_bytes(self) -> int:
        return self.max_transfer_size * 1024 * 1024

    @property
    def limits(self) -> TransferLimits:
        return TransferLimits(self.max_transfer_instances, self.max_instance_bytes, self.max_transfer_bytes)


@dataclass(frozen=True)
class Peer:
    """One `OrthancPeers` entry (spec 2.2 and 11.3), normalised from either form.

    Secrets and headers are left out of `repr()` so that logging a configuration leaks nothing.
    """

    name: str
    url: str  # always ends with "/"
    username: str = ""
    password: str = field(default="", repr=False)
    http_headers: dict[str, str] = field(default_factory=dict, repr=False)
    certificate_file: str = ""
    certificate_key_file: str = ""
    certificate_key_password: str = field(default="", repr=False)
    pkcs11: bool = False
    timeout: int = 0  # seconds; 0 = the global HttpTimeout
    properties: dict[str, str] = field(default_factory=dict)  # user properties (RemoteSelf, ...)

    @property
    def remote_self(self) -> str | None:
        """Name under which the peer knows us; set means "send" is done bidirectionally (8.3)."""
        return self.properties.get("RemoteSelf")

    @property
    def basic_auth(self) -> tuple[str, str] | None:
        """Orthanc sends Basic auth only when both username and password are non-empty."""
        if self.username and self.password:
            return (self.username, self.password)
        return None

    def effective_timeout(self, global_timeout: int) -> int:
        """The peer's own `Timeout` if set, else the global `HttpTimeout` (spec 2.2)."""
        return self.timeout if self.timeout > 0 else global_timeout


@dataclass(frozen=True)
class ObjectStorageConfig:
    """The `AwsS3Storage` or `AzureBlobStorage` section (Orthanc's object-storage plugins), validated.

    The field names are those of `accelerator.store.objects.ObjectStorageSettings`, plus
    `hybrid_mode`: the store builds its settings from this object
    (`ObjectStorageSettings(**config.settings_kwargs())`), so this module needs no store import.
    Fields a backend does not use keep the defaults of the `AwsS3Storage` table ("" for the names
    and keys of the other backend). Secrets are left out of `repr()`.
    """

    kind: str  # "s3" | "azure"
    bucket_name: str  # S3 only
    region: str  # S3 only
    access_key: str  # S3 only; "" = the default credentials chain
    secret_key: str = field(repr=False)  # S3 only
    endpoint: str  # S3 only; "" = AWS
    virtual_addressing: bool  # S3 only; false = path-style requests (MinIO, SeaweedFS, ...)
    root_path: str  # prefix of every object name; never starts with "/"
    storage_structure: str  # "flat" (<RootPath>/<uuid>.dcm) | "legacy" (<RootPath>/ab/cd/<uuid>)
    connection_timeout: int  # seconds
    request_timeout: int  # seconds, whole request
    max_connections: int
    max_retries: int
    connection_string: str = field(repr=False)  # Azure only
    container_name: str  # Azure only
    hybrid_mode: str  # "Disabled" | "WriteToFileSystem" | "WriteToObjectStorage"

    def settings_kwargs(self) -> dict[str, Any]:
        """Every field but `hybrid_mode`: the keyword arguments of the store's settings."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hybrid_mode"}


@dataclass(frozen=True)
class GatewayConfig:
    """The `Gateway` section (ours): the plain Orthanc (no transfers plugin) this daemon stands in
    front of. What transfers bring in is forwarded into it; what peers take from us is fetched
    from it. `keep_copies` false: an instance forwarded and checked there leaves our store."""

    url: str  # ends with "/"
    username: str = ""
    password: str = field(default="", repr=False)
    keep_copies: bool = True
    workers: int = 16  # requests to the Orthanc at once
    timeout: int = 60  # seconds per request

    def as_peer(self) -> Peer:
        return Peer(name="gateway", url=self.url, username=self.username, password=self.password,
                    timeout=self.timeout)


_GATEWAY_KEYS = {"Url", "Username", "Password", "KeepCopies", "Workers", "Timeout"}


def _parse_gateway(mapping: Mapping[str, Any]) -> tuple[GatewayConfig | None, list[str]]:
    """The `Gateway` section, validated, and its unknown keys."""
    if "Gateway" not in mapping:
        return None, []
    section = _object(mapping["Gateway"], "Gateway")
    url = section.get("Url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise _fail("Gateway.Url", "an http:// or https:// URL", url)
    values: dict[str, Any] = {"url": url.rstrip("/") + "/"}
    for key, attr in (("Username", "username"), ("Password", "password")):
        if key in section:
            if not isinstance(section[key], str):
                raise _fail(f"Gateway.{key}", "a string", section[key])
            values[attr] = section[key]
    if "KeepCopies" in section:
        if not isinstance(section["KeepCopies"], bool):
            raise _fail("Gateway.KeepCopies", "true or false", section["KeepCopies"])
        values["keep_copies"] = section["KeepCopies"]
    for key, attr, low, high in (("Workers", "workers", 1, 256), ("Timeout", "timeout", 1, 3600)):
        if key in section:
            value = section[key]
            if type(value) is not int or not low <= value <= high:
                raise _fail(f"Gateway.{key}", f"an integer from {low} to {high}", value)
            values[attr] = value
    return GatewayConfig(**values), [f"Gateway.{k}" for k in section if k not in _GATEWAY_KEYS]


@dataclass(frozen=True)
class PostgreSQLConfig:
    """The `PostgreSQL` section (Orthanc's PostgreSQL plugin), validated. With `EnableIndex` the
    index lives in that database instead of SQLite; the field names are those of
    `accelerator.store.postgres_index.PostgresSettings` (`settings_kwargs()`), plus
    `enable_index`. `Lock` (default true, as the plugin) keeps the database to one daemon:
    replicas sharing it set it to false. Secrets are left out of `repr()`."""

    enable_index: bool
    connection_uri: str = field(repr=False)  # wins over host/port/database/username/password
    host: str
    port: int
    database: str
    username: str
    password: str = field(repr=False)
    enable_ssl: bool
    lock: bool
    maximum_connection_retries: int
    connection_retry_interval: int  # seconds
    index_connections_count: int

    def settings_kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "enable_index"}


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; build it with `load_config` or `config_from_dict`."""

    name: str
    http_port: int
    http_bind_address: str  # "" = all interfaces (our extension)
    storage_directory: str  # absolute
    index_directory: str  # absolute; defaults to storage_directory
    storage_compression: bool
    overwrite_instances: bool
    remote_access_allowed: bool
    authentication_enabled: bool
    registered_users: dict[str, str] = field(repr=False)
    maximum_request_body_size: int  # MiB (our extension)
    http_timeout: int  # seconds
    http_request_timeout: int  # seconds a client has to send a request's headers
    http_max_connections: int  # open client connections at once (our extension)
    https_verify_peers: bool
    https_ca_certificates: str
    http_proxy: str
    concurrent_jobs: int
    jobs_history_size: int
    save_jobs: bool
    jobs_lease: int  # seconds (replicas on a shared PostgreSQL index)
    dicom_aet: str
    dicom_port: int
    http_describe_errors: bool
    orthanc_peers: dict[str, Peer]
    transfers: TransfersConfig
    object_storage: ObjectStorageConfig | None = None  # None: the filesystem only
    postgresql: PostgreSQLConfig | None = None  # None: no PostgreSQL section
    gateway: GatewayConfig | None = None  # None: not in front of a plain Orthanc
    unknown_keys: tuple[str, ...] = ()
    source: str = "<defaults>"

    @classmethod
    def defaults(cls) -> "Config":
        """The configuration used when no file is given (same as `load_config(None)`)."""
        return config_from_dict({}, source="<defaults>")

    @property
    def maximum_request_body_bytes(self) -> int:
        return self.maximum_request_body_size * 1024 * 1024

    @property
    def postgresql_index(self) -> PostgreSQLConfig | None:
        """The PostgreSQL section when the index lives there (`EnableIndex`), else None (SQLite)."""
        return self.postgresql if self.postgresql is not None and self.postgresql.enable_index else None

    @property
    def hybrid_mode(self) -> str | None:
        """The object storage's `HybridMode`; None when there is no object storage at all."""
        return self.object_storage.hybrid_mode if self.object_storage is not None else None


# --------------------------------------------------------------------------------------------
# Validators: each takes (value, key path) and returns the normalised value or raises
# --------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as it would be written in JSON, shortened: error messages quote the user's input."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fail(path: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{path}: expected {expected}, got {_show(value)}")


def _is_int(value: Any) -> bool:
    # JSON integers only: Python's bool is an int subclass, floats (even 4.0) are not integers.
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any, str], int]:
    if maximum is None:
        expected = f"an integer >= {minimum}"
    else:
        expected = f"an integer from {minimum} to {maximum}"

    def check(value: Any, path: str) -> int:
        if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
            raise _fail(path, expected, value)
        return value

    return check


def _boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "true or false", value)
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, "a string", value)
    return value


def _nonempty_string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, "a non-empty string", value)
    return value


def _string_map(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _fail(path, "an object of strings", value)
    for key, item in value.items():
        _string(item, f"{path}.{key}")
    return dict(value)


def _object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "an object", value)
    return value


def _choice(*choices: str) -> Callable[[Any, str], str]:
    """One of the given strings, compared exactly (Orthanc's plugins compare case-sensitively)."""
    quoted = [json.dumps(c) for c in choices]
    expected = ", ".join(quoted[:-1]) + " or " + quoted[-1] if len(quoted) > 1 else quoted[0]

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise _fail(path, expected, value)
        return value

    return check


def _secret(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """`check`, but an error does not quote the value: a misplaced secret stays out of logs."""

    def hidden(value: Any, path: str) -> Any:
        try:
            return check(value, path)
        except ConfigError as error:
            # "<path>: expected <what>, got <value>": neither path nor <what> contains ", got ".
            shown = str(error).split(", got ", 1)[0]
            raise ConfigError(f"{shown} (the value is a secret: not shown)") from None

    return hidden


def _trimmed_nonempty_string(value: Any, path: str) -> str:
    # The Azure plugin trims ConnectionString and ContainerName (an end of line broke the URI).
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, "a non-empty string", value)
    return value.strip()


def _root_path(value: Any, path: str) -> str:
    # The plugins refuse to start with a RootPath starting with "/".
    if not isinstance(value, str) or value.startswith("/"):
        raise _fail(path, 'a string that does not start with "/"', value)
    return value


def _storage_encryption(value: Any, path: str) -> dict[str, Any]:
    """The plugins' client-side encryption: accepted only when it is off.

    The plugins encrypt when the section has a `MasterKey` and `Enable` is not false; objects are
    then encrypted and named `<uuid>.dcm.enc`, which we neither read nor write.
    """
    section = _object(value, path)
    enable = section.get("Enable", True)
    if not isinstance(enable, bool):
        raise _fail(f"{path}.Enable", "true or false", enable)
    if enable and "MasterKey" in section:
        raise ConfigError(
            f"{path}: client-side encryption is not supported (the plugin would store encrypted "
            f'objects named <uuid>.dcm.enc, which accelerator cannot read or write); set "Enable": '
            "false or remove the MasterKey"
        )
    return section


# --------------------------------------------------------------------------------------------
# Option tables: the single source of names, defaults and checks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    key: str  # Orthanc name
    attr: str | None  # Config / TransfersConfig / ObjectStorageConfig field; None = not used
    default: Any  # None = derived from other options (see _build), or required in a section
    check: Callable[[Any, str], Any]


_OPTIONS: tuple[_Option, ...] = (
    _Option("Name", "name", "accelerator", _string),
    _Option("HttpPort", "http_port", 8042, _integer(1, 65535)),
    _Option("HttpBindAddress", "http_bind_address", "", _string),
    _Option("StorageDirectory", "storage_directory", "OrthancStorage", _nonempty_string),
    _Option("IndexDirectory", "index_directory", None, _nonempty_string),
    _Option("StorageCompression", "storage_compression", False, _boolean),
    _Option("OverwriteInstances", "overwrite_instances", False, _boolean),
    _Option("RemoteAccessAllowed", "remote_access_allowed", False, _boolean),
    _Option("AuthenticationEnabled", "authentication_enabled", None, _boolean),
    _Option("RegisteredUsers", "registered_users", {}, _string_map),
    _Option("MaximumRequestBodySize", "maximum_request_body_size", 4096, _integer(1)),
    _Option("HttpTimeout", "http_timeout", 60, _integer(0)),
    # Orthanc's (civetweb's request_timeout_ms): here the time a client has to send a request's
    # headers, and the longest pause while it sends a body. Slow clients cannot hold connections.
    _Option("HttpRequestTimeout", "http_request_timeout", 30, _integer(1)),
    # Ours: connections beyond this get 503 at once, so idle or hostile ones cannot starve others.
    _Option("HttpMaxConnections", "http_max_connections", 256, _integer(1)),
    _Option("HttpsVerifyPeers", "https_verify_peers", True, _boolean),
    _Option("HttpsCACertificates", "https_ca_certificates", "", _string),
    _Option("HttpProxy", "http_proxy", "", _string),
    _Option("ConcurrentJobs", "concurrent_jobs", 2, _integer(1)),
    _Option("JobsHistorySize", "jobs_history_size", 10, _integer(0)),
    _Option("SaveJobs", "save_jobs", True, _boolean),
    # Ours: seconds a replica's claim on a job lasts without renewal (it renews every third of
    # it); a replica killed mid-job loses its jobs to the others this long after it died. Only
    # replicas sharing a PostgreSQL index (`Lock` false) use it.
    _Option("JobsLease", "jobs_lease", 15, _integer(3, 3600)),
    _Option("DicomAet", "dicom_aet", "ORTHANC", _string),
    _Option("DicomPort", "dicom_port", 4242, _integer(1, 65535)),
    _Option("HttpDescribeErrors", "http_describe_errors", True, _boolean),
)

_TRANSFERS_OPTIONS: tuple[_Option, ...] = (
    # Ours: 12, not the plugin's 4: on lossy links a loss-limited TCP stream carries a few
    # Mbit/s, so more streams are needed to fill the link (bench: 59-68 % -> 83-91 % of it).
    _Option("Threads", "threads", 12, _integer(1)),
    _Option("BucketSize", "bucket_size", 4096, _integer(1)),
    _Option("CacheSize", "cache_size", 512, _integer(1)),
    _Option("MaxPushTransactions", "max_push_transactions", 4, _integer(1)),
    _Option("MaxHttpRetries", "max_http_retries", 3, _integer(0)),
    _Option("PeerConnectivityTimeout", "peer_connectivity_timeout", 2, _integer(1)),
    _Option("PeerCommitTimeout", "peer_commit_timeout", 600, _integer(1)),
    _Option("CommitThreadsCount", "commit_threads_count", 1, _integer(1)),
    # Ours: a pull skips instances already stored here with the same MD5 (job counters then
    # differ from the plugin's, hence off by default). A pull query can also ask for it.
    _Option("SkipStoredInstances", "skip_stored_instances", False, _boolean),
    # Ours: shrink BucketSize for small transfers so every worker gets several buckets (no idle
    # worker at the end), and cut the last round of buckets in four so that the workers finish
    # together; false = exactly the plugin's plan.
    _Option("AdaptiveBucketSize", "adaptive_bucket_size", True, _boolean),
    # Ours: a push transaction that receives no request for this long is discarded (the plugin
    # sends no DELETE when its push job is canceled); 0 = never.
    _Option("PushTransactionTimeout", "push_transaction_timeout", 3600, _integer(0)),
    # Ours: bounds on what one transfer (a push plan or a pull's lookup answer) may declare; a
    # transfer must also fit in the free space of the storage area's disk.
    _Option("MaxTransferInstances", "max_transfer_instances", 50000, _integer(1)),
    _Option("MaxInstanceSize", "max_instance_size", 16384, _integer(1)),  # MiB
    _Option("MaxTransferSize", "max_transfer_size", 1048576, _integer(1)),  # MiB (1 TiB)
    # Ours: advertise (GET /transfers/capabilities) and use with peers that advertise it too a
    # codec better than gzip ("shuffle-zstd"); a real plugin always gets exactly what it knows.
    _Option("NegotiatedCodecs", "negotiated_codecs", True, _boolean),
)

HYBRID_MODES: tuple[str, ...] = ("Disabled", "WriteToFileSystem", "WriteToObjectStorage")

# Options both object-storage sections share (Orthanc book, "Cloud Object Storage plugins"; the
# defaults are the plugins' own).
_COMMON_OBJECT_STORAGE_OPTIONS: tuple[_Option, ...] = (
    _Option("RootPath", "root_path", "", _root_path),
    _Option("StorageStructure", "storage_structure", "flat", _choice("flat", "legacy")),
    _Option("HybridMode", "hybrid_mode", "Disabled", _choice(*HYBRID_MODES)),
    # Superseded by HybridMode; as in the plugins, true with HybridMode "Disabled" means
    # "WriteToObjectStorage" (see _parse_object_storage).
    _Option("MigrationFromFileSystemEnabled", None, False, _boolean),
    # Lets the plugins read "<uuid>.unk" header attachments of 2021 versions; we only store DICOM
    # attachments (<uuid>.dcm), so it changes nothing for us.
    _Option("EnableLegacyUnknownFiles", None, False, _boolean),
    _Option("StorageEncryption", None, {}, _storage_encryption),  # refused when enabled
)

_AWS_S3_OPTIONS: tuple[_Option, ...] = (
    # default None: required when the section is present (the plugin does not start without).
    _Option("BucketName", "bucket_name", None, _nonempty_string),
    _Option("Region", "region", None, _nonempty_string),
    _Option("AccessKey", "access_key", "", _string),  # "" = the default credentials chain
    _Option("SecretKey", "secret_key", "", _secret(_string)),
    _Option("Endpoint", "endpoint", "", _string),  # S3-compatible servers
    _Option("VirtualAddressing", "virtual_addressing", True, _boolean),
    _Option("ConnectionTimeout", "connection_timeout", 30, _integer(1)),  # seconds
    _Option("RequestTimeout", "request_timeout", 1200, _integer(1)),  # seconds
    # The plugin's source (mainline, not yet in the book's sample): 25 connections, 10 retries.
    _Option("MaxConnections", "max_connections", 25, _integer(1)),
    _Option("MaxRetries", "max_retries", 10, _integer(0)),
    *_COMMON_OBJECT_STORAGE_OPTIONS,
    _Option("UseTransferManager", None, False, _boolean),  # AWS SDK client mode: not ours
    _Option("EnableAwsSdkLogs", None, False, _boolean),
)
#: Read by the AWS plugin, not in the book: accepted without a check or a warning. ConnectTimeout
#: is the older name of ConnectionTimeout (which wins when both are given, as in the plugin).
_AWS_S3_IGNORED = frozenset({"ConnectTimeout", "TransferPoolSize", "TransferBufferSize"})

_AZURE_BLOB_OPTIONS: tuple[_Option, ...] = (
    _Option("ConnectionString", "connection_string", None, _secret(_trimmed_nonempty_string)),
    _Option("ContainerName", "container_name", None, _trimmed_nonempty_string),
    # We never create the container: a missing one is an error at start.
    _Option("CreateContainerIfNotExists", None, True, _boolean),
    *_COMMON_OBJECT_STORAGE_OPTIONS,
)

#: section -> (kind, options, keys accepted silently)
_OBJECT_STORAGE_SECTIONS: Mapping[str, tuple[str, tuple[_Option, ...], frozenset[str]]] = {
    "AwsS3Storage": ("s3", _AWS_S3_OPTIONS, _AWS_S3_IGNORED),
    "AzureBlobStorage": ("azure", _AZURE_BLOB_OPTIONS, frozenset()),
}
#: Sections of Orthanc storage plugins we cannot honour: refused rather than silently storing the
#: files somewhere else than the site's Orthanc does.
_UNSUPPORTED_STORAGE_SECTIONS: Mapping[str, str] = {
    "GoogleCloudStorage": "Google Cloud Storage is not supported (only AwsS3Storage and "
    "AzureBlobStorage)",
    "BlobStorage": "the old Azure plugin format is not supported: write an AzureBlobStorage "
    'section with "ConnectionString": "DefaultEndpointsProtocol=https;AccountName=...;'
    'AccountKey=..." and "ContainerName"',
}

#: Orthanc name -> default; None means derived (IndexDirectory, AuthenticationEnabled).
DEFAULTS: Mapping[str, Any] = {o.key: o.default for o in _OPTIONS}
TRANSFERS_DEFAULTS: Mapping[str, int | bool] = {o.key: o.default for o in _TRANSFERS_OPTIONS}
#: Option -> default inside each object-storage section; None means required.
AWS_S3_DEFAULTS: Mapping[str, Any] = {o.key: o.default for o in _AWS_S3_OPTIONS}
AZURE_BLOB_DEFAULTS: Mapping[str, Any] = {o.key: o.default for o in _AZURE_BLOB_OPTIONS}

#: Orthanc (core and common plugins) options that do not apply to us: accepted without warning so
#: that the configuration of a real Orthanc can be reused as is.
IGNORED_ORTHANC_OPTIONS: tuple[str, ...] = (
    "AcceptedSopClasses", "AcceptedTransferSyntaxes", "Authorization",
    "BuiltinDecoderTranscoderOrder", "CaseSensitivePN", "CheckRevisions",
    "DatabaseServerIdentifier", "DefaultEncoding", "DefaultPrivateCreator", "DeidentifyLogs",
    "DeidentifyLogsDicomVersion",
    "DelayedDeletion", "Dictionary", "DicomAlwaysAllowEcho", "DicomAlwaysAllowFind",
    "DicomAlwaysAllowFindWorklist", "DicomAlwaysAllowGet", "DicomAlwaysAllowMove",
    "DicomAlwaysAllowStore", "DicomAssociationCloseDelay", "DicomCheckCalledAet",
    "DicomCheckModalityHost", "DicomEchoChecksFind", "DicomLossyTranscodingQuality",
    "DicomModalities", "DicomModalitiesInDatabase", "DicomScpTimeout",
    "DicomScuPreferredTransferSyntax", "DicomScuTimeout", "DicomServerEnabled",
    "DicomThreadsCount", "DicomTlsCertificate", "DicomTlsCiphersAccepted", "DicomTlsEnabled",
    "DicomTlsMinimumProtocolVersion", "DicomTlsPrivateKey", "DicomTlsRemoteCertificateRequired",
    "DicomTlsTrustedCertificates", "DicomWeb", "ExecuteLuaEnabled", "ExtraMainDicomTags",
    "Gdcm", "Housekeeper", "HttpCompressionEnabled", "HttpServerEnabled",
    "HttpThreadsCount", "HttpVerbose", "IngestTranscoding", "IngestTranscodingOfCompressed",
    "IngestTranscodingOfUncompressed", "KeepAlive", "KeepAliveTimeout", "LimitFindInstances",
    "LimitFindResults", "LoadPrivateDictionary", "LogExportedResources", "LuaHeartBeatPeriod",
    "LuaScripts", "MallocArenaMax", "MaximumPatientCount", "MaximumPduLength",
    "MaximumStorageCacheSize", "MaximumStorageMode", "MaximumStorageSize", "MediaArchiveSize",
    "MetricsEnabled", "MySQL", "Odbc", "OrthancExplorer2", "OrthancExplorerEnabled",
    "OrthancPeersInDatabase", "Plugins", "PostgreSQL", "PythonScript", "PythonVerbose",
    "QueryRetrieveSize", "ReadOnly", "RejectedSopClasses", "RestApiWriteToFileSystemEnabled",
    "SslAcceptedCiphers", "SslCertificate", "SslEnabled", "SslMinimumProtocolVersion",
    "SslTrustedClientCertificates", "SslVerifyPeers", "StableAge", "StorageAccessOnFind",
    "StorageCommitmentReportsSize", "StoreDicom", "StoreMD5ForAttachments", "StoneWebViewer",
    "StrictAetComparison", "SyncStorageArea", "SynchronousCMove", "SynchronousZipStream",
    "TcpNoDelay", "TemporaryDirectory", "TranscodeDicomProtocol", "UnknownSopClassAccepted",
    "UserContentType", "UserMetadata", "Warnings", "WebDavDeleteAllowed", "WebDavEnabled",
    "WebDavUploadAllowed", "Worklists", "ZipLoaderThreads",
)

_KNOWN_KEYS = (
    frozenset(o.key for o in _OPTIONS)
    | {"OrthancPeers", "Transfers", "Gateway", "PostgreSQL"}
    | set(_OBJECT_STORAGE_SECTIONS)
    | set(_UNSUPPORTED_STORAGE_SECTIONS)
)
_IGNORED_KEYS = frozenset(IGNORED_ORTHANC_OPTIONS) - _KNOWN_KEYS


# --------------------------------------------------------------------------------------------
# OrthancPeers (spec 11.3)
# --------------------------------------------------------------------------------------------

_PEER_STRING_KEYS = {
    "Username": "username",
    "Password": "password",
    "CertificateFile": "certificate_file",
    "CertificateKeyFile": "certificate_key_file",
    "CertificateKeyPassword": "certificate_key_password",
}
_PEER_RESERVED = {"Url", "URL", "HttpHeaders", "Pkcs11", "Timeout", *_PEER_STRING_KEYS}
_URL_EXPECTED = "a URL starting with http:// or https://"


def _peer_url(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.match(r"https?://[^/]", value):
        raise _fail(path, _URL_EXPECTED, value)
    return value if value.endswith("/") else value + "/"


def _parse_peer(name: str, entry: Any, path: str) -> Peer:
    if isinstance(entry, list):
        if len(entry) not in (1, 3):
            raise ConfigError(
                f"{path}: expected [url] or [url, username, password], "
                f"got a list of {len(entry)} elements"
            )
        url = _peer_url(entry[0], f"{path}[0]")
        if len(entry) == 1:
            return Peer(name=name, url=url)
        username = _string(entry[1], f"{path}[1]")
        password = _string(entry[2], f"{path}[2]")
        return Peer(name=name, url=url, username=username, password=password)

    if not isinstance(entry, dict):
        raise _fail(path, "[url], [url, username, password] or an object", entry)

    # Orthanc reads "Url" first and falls back to "URL".
    url_key = "Url" if "Url" in entry else "URL" if "URL" in entry else None
    if url_key is None:
        raise ConfigError(f"{path}.Url: missing (expected {_URL_EXPECTED})")
    kwargs: dict[str, Any] = {"url": _peer_url(entry[url_key], f"{path}.{url_key}")}
    for key, attr in _PEER_STRING_KEYS.items():
        if key in entry:
            kwargs[attr] = _string(entry[key], f"{path}.{key}")
    if "HttpHeaders" in entry:
        kwargs["http_headers"] = _string_map(entry["HttpHeaders"], f"{path}.HttpHeaders")
    if "Pkcs11" in entry:
        kwargs["pkcs11"] = _boolean(entry["Pkcs11"], f"{path}.Pkcs11")
    if "Timeout" in entry:
        kwargs["timeout"] = _integer(0)(entry["Timeout"], f"{path}.Timeout")
    if (kwargs.get("certificate_key_file") or kwargs.get("certificate_key_password")) and not (
        kwargs.get("certificate_file")
    ):
        raise ConfigError(f"{path}.CertificateFile: required when a certificate key is given")

    properties: dict[str, str] = {}
    for key, value in entry.items():
        if key in _PEER_RESERVED:
            continue
        # Orthanc's user properties: strings as is, booleans "1"/"0", integers in decimal.
        if isinstance(value, bool):
            properties[key] = "1" if value else "0"
        elif _is_int(value):
            properties[key] = str(value)
        elif isinstance(value, str):
            properties[key] = value
        else:
            raise _fail(f"{path}.{key}", "a string, a boolean or an integer (user property)", value)
    return Peer(name=name, properties=properties, **kwargs)


def _parse_peers(value: Any, path: str) -> dict[str, Peer]:
    if not isinstance(value, dict):
        raise _fail(path, "an object of peers", value)
    peers: dict[str, Peer] = {}
    for name, entry in value.items():
        if not name:
            raise ConfigError(f"{path}: a peer name must not be empty")
        peers[name] = _parse_peer(name, entry, f"{path}.{name}")
    return peers


# --------------------------------------------------------------------------------------------
# Object storage: AwsS3Storage / AzureBlobStorage
# --------------------------------------------------------------------------------------------


def _parse_object_storage(
    mapping: Mapping[str, Any], where: Callable[[str], str]
) -> tuple[ObjectStorageConfig | None, list[str]]:
    """The one object-storage section, validated, and the unknown keys found inside it."""
    for name, reason in _UNSUPPORTED_STORAGE_SECTIONS.items():
        if name in mapping:
            raise ConfigError(f"{name}: {reason}{where(name)}")
    present = [name for name in _OBJECT_STORAGE_SECTIONS if name in mapping]
    if not present:
        return None, []
    if len(present) > 1:
        raise ConfigError(
            f"{' and '.join(n + where(n) for n in present)}: only one object-storage section may "
            "be present (Orthanc loads a single object-storage plugin)"
        )
    name = present[0]
    kind, options, ignored = _OBJECT_STORAGE_SECTIONS[name]
    try:
        section = _object(mapping[name], name)
        checked: dict[str, Any] = {}
        for option in options:
            path = f"{name}.{option.key}"
            if option.key in section:
                checked[option.key] = option.check(section[option.key], path)
            elif option.default is None:
                raise ConfigError(f"{path}: missing (required when the {name} section is present)")
            else:
                checked[option.key] = option.default
        if kind == "s3" and "ConnectTimeout" in section and "ConnectionTimeout" not in section:
            checked["ConnectionTimeout"] = _integer(1)(
                section["ConnectTimeout"], f"{name}.ConnectTimeout"
            )
    except ConfigError as error:
        raise ConfigError(f"{error}{where(name)}") from None

    # Fields the backend does not use: the AwsS3Storage defaults, "" for the other backend's names.
    values: dict[str, Any] = {
        o.attr: o.default for o in _AWS_S3_OPTIONS if o.attr and o.default is not None
    }
    values.update(bucket_name="", region="", connection_string="", container_name="")
    values.update({o.attr: checked[o.key] for o in options if o.attr})
    if checked["MigrationFromFileSystemEnabled"] and values["hybrid_mode"] == "Disabled":
        values["hybrid_mode"] = "WriteToObjectStorage"  # the plugins' reading of the old option

    known = {o.key for o in options} | ignored
    unknown = [f"{name}.{key}" for key in section if key not in known]
    return ObjectStorageConfig(kind=kind, **values), unknown


# --------------------------------------------------------------------------------------------
# PostgreSQL (the index of replicas)
# --------------------------------------------------------------------------------------------

def _no_storage_in_postgresql(value: Any, path: str) -> bool:
    if _boolean(value, path):
        raise ConfigError(f"{path}: attachments in PostgreSQL are not supported; keep them in "
                          "StorageDirectory or in object storage (AwsS3Storage, AzureBlobStorage)")
    return False


# Orthanc's PostgreSQL plugin options and defaults (Orthanc book, "PostgreSQL plugins").
_POSTGRESQL_OPTIONS: tuple[_Option, ...] = (
    _Option("EnableIndex", "enable_index", False, _boolean),
    _Option("EnableStorage", None, False, _no_storage_in_postgresql),
    _Option("ConnectionUri", "connection_uri", "", _secret(_string)),
    _Option("Host", "host", "localhost", _string),
    _Option("Port", "port", 5432, _integer(1, 65535)),
    _Option("Database", "database", "", _string),
    _Option("Username", "username", "", _string),
    _Option("Password", "password", "", _secret(_string)),
    _Option("EnableSsl", "enable_ssl", False, _boolean),
    _Option("Lock", "lock", True, _boolean),  # false for replicas sharing the database
    _Option("MaximumConnectionRetries", "maximum_connection_retries", 10, _integer(0)),
    _Option("ConnectionRetryInterval", "connection_retry_interval", 5, _integer(0)),  # seconds
    _Option("IndexConnectionsCount", "index_connections_count", 50, _integer(1)),
)
#: Read by the plugin, no use to us (our transactions and housekeeping are our own).
_POSTGRESQL_IGNORED = frozenset({"EnableVerboseLogs", "TransactionMode", "HousekeepingInterval",
                                 "AllowInconsistentChildCounts"})


def _parse_postgresql(
    mapping: Mapping[str, Any], where: Callable[[str], str]
) -> tuple[PostgreSQLConfig | None, list[str]]:
    """The `PostgreSQL` section, validated, and the unknown keys found inside it."""
    if "PostgreSQL" not in mapping:
        return None, []
    try:
        section = _object(mapping["PostgreSQL"], "PostgreSQL")
        values = {}
        for option in _POSTGRESQL_OPTIONS:
            value = option.check(section[option.key], f"PostgreSQL.{option.key}") if option.key in section \
                else option.default
            if option.attr:
                values[option.attr] = value
    except ConfigError as error:
        raise ConfigError(f"{error}{where('PostgreSQL')}") from None
    known = {o.key for o in _POSTGRESQL_OPTIONS} | _POSTGRESQL_IGNORED
    return PostgreSQLConfig(**values), [f"PostgreSQL.{k}" for k in section if k not in known]


# --------------------------------------------------------------------------------------------
# Building a Config from a parsed mapping
# --------------------------------------------------------------------------------------------


def config_from_dict(
    mapping: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None = None,
    *,
    source: str = "<dict>",
) -> Config:
    """Validate an already parsed configuration (Orthanc option names) into a `Config`.

    Relative directories are resolved against `base_dir`, or the current directory if None.
    Used by `load_config` and by code and tests that build configurations in memory.
    """
    return _build(mapping, base_dir, source, origins=None)


def _build(
    mapping: Mapping[str, Any],
    base_dir: str | os.PathLike[str] | None,
    source: str,
    origins: Mapping[str, str] | None,
) -> Config:
    if not isinstance(mapping, Mapping):
        raise _fail("(top level)", "an object", mapping)

    def where(key: str) -> str:
        # Name the file an option came from when it was read from a folder of files.
        return f" (in {origins[key]})" if origins and key in origins else ""

    values: dict[str, Any] = {}
    for option in _OPTIONS:
        if option.key in mapping:
            try:
                values[option.attr] = option.check(mapping[option.key], option.key)
            except ConfigError as error:
                raise ConfigError(f"{error}{where(option.key)}") from None
        else:
            values[option.attr] = option.default

    base = Path(base_dir) if base_dir is not None else Path(os.getcwd())
    values["storage_directory"] = os.path.abspath(base / values["storage_directory"])
    if values["index_directory"] is None:
        values["index_directory"] = values["storage_directory"]
    else:
        values["index_directory"] = os.path.abspath(base / values["index_directory"])
    if values["authentication_enabled"] is None:
        # Orthanc's rule: a server reachable from other hosts asks for credentials by default.
        values["authentication_enabled"] = values["remote_access_allowed"]
    values["registered_users"] = dict(values["registered_users"])

    unknown = [k for k in mapping if k not in _KNOWN_KEYS and k not in _IGNORED_KEYS]

    try:
        values["orthanc_peers"] = _parse_peers(mapping.get("OrthancPeers", {}), "OrthancPeers")
    except ConfigError as error:
        raise ConfigError(f"{error}{where('OrthancPeers')}") from None

    try:
        transfers = _object(mapping.get("Transfers", {}), "Transfers")
        transfer_values = {
            o.attr: o.check(transfers[o.key], f"Transfers.{o.key}") if o.key in transfers
            else o.default
            for o in _TRANSFERS_OPTIONS
        }
    except ConfigError as error:
        raise ConfigError(f"{error}{where('Transfers')}") from None
    known_transfers = {o.key for o in _TRANSFERS_OPTIONS}
    unknown += [f"Transfers.{k}" for k in transfers if k not in known_transfers]
    values["transfers"] = TransfersConfig(**transfer_values)

    values["object_storage"], unknown_in_storage = _parse_object_storage(mapping, where)
    unknown += unknown_in_storage
    values["postgresql"], unknown_in_postgresql = _parse_postgresql(mapping, where)
    unknown += unknown_in_postgresql
    try:
        values["gateway"], unknown_in_gateway = _parse_gateway(mapping)
    except ConfigError as error:
        raise ConfigError(f"{error}{where('Gateway')}") from None
    unknown += unknown_in_gateway

    return Config(**values, unknown_keys=tuple(unknown), source=source)


# --------------------------------------------------------------------------------------------
# Text: comments and ${VAR} substitution, in one pass that knows where strings are
# --------------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def _preprocess(text: str, environ: Mapping[str, str], source: str) -> str:
    """Drop comments and substitute variables outside comments; knows the key path of each spot.

    A small JSON structure tracker (stack of objects/arrays, current key) runs alongside so that
    an unset variable can be reported with the option it was meant for.
    """
    out: list[str] = []
    # Each frame: [is_object, current key or array index, expecting a key]
    stack: list[list[Any]] = []

    def path(in_key: bool = False) -> str:
        frames = stack[:-1] if in_key and stack else stack
        parts: list[str] = []
        for is_object, label, _ in frames:
            if is_object:
                if label is not None:
                    parts.append(("." if parts else "") + str(label))
            else:
                parts.append(f"[{label}]")
        return "".join(parts) or "(top level)"

    def substitute(match: re.Match[str], start: int, in_string: bool, in_key: bool) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if default is not None and not value:
            return default  # copied as written: it is already JSON text
        if value is None:
            raise ConfigError(
                f"{source}: {path(in_key)}: environment variable {name} is not set "
                f"(line {_line_of(text, start + match.start())}; "
                f"write ${{{name}:-default}} to give a default)"
            )
        return json.dumps(value, ensure_ascii=False)[1:-1] if in_string else value

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            if j >= n:  # unterminated string: let the JSON parser report it
                out.append(text[i:])
                break
            raw = text[i : j + 1]
            in_key = bool(stack) and stack[-1][0] and stack[-1][2]
            out.append(_VARIABLE.sub(lambda m: substitute(m, i, True, in_key), raw))
            if in_key:
                try:
                    stack[-1][1] = json.loads(raw)
                except ValueError:
                    stack[-1][1] = raw[1:-1]
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j  # keep the newline: JSON errors keep their line numbers
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ConfigError(f"{source}: unterminated /* comment at line {_line_of(text, i)}")
            out.append("".join(ch if ch == "\n" else " " for ch in text[i : j + 2]))
            i = j + 2
        elif c == "$" and (match := _VARIABLE.match(text, i)):
            out.append(substitute(match, 0, False, False))
            i = match.end()
        else:
            if c == "{":
                stack.append([True, None, True])
            elif c == "[":
                stack.append([False, 0, False])
            elif c in "}]":
                if stack:
                    stack.pop()
            elif c == ":" and stack:
                stack[-1][2] = False
            elif c == "," and stack:
                if stack[-1][0]:
                    stack[-1][2] = True
                else:
                    stack[-1][1] += 1
            out.append(c)
            i += 1
    return "".join(out)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_config_text(
    text: str, environ: Mapping[str, str] | None = None, source: str = "<text>"
) -> dict[str, Any]:
    """Parse one Orthanc-style JSON document (comments, `${VAR}`) into its top-level object."""
    env = os.environ if environ is None else environ
    cleaned = _preprocess(text.lstrip("\ufeff"), env, source)
    try:
        document = json.loads(cleaned, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{source}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from None
    except ValueError as error:
        raise ConfigError(f"{source}: invalid JSON: {error}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    return document


def _read_file(path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the configuration file: {error}") from None
    return parse_config_text(text, environ, str(path))


def load_config(
    path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Config:
    """Load, merge and validate the configuration at `path` (a file, a folder, or None).

    `environ` (default `os.environ`) feeds `${VAR}` references. Relative directories are resolved
    against the current working directory now, like Orthanc, so a later chdir changes nothing.
    """
    if path is None:
        return Config.defaults()
    env = os.environ if environ is None else environ
    location = Path(path)
    if location.is_dir():
        files = sorted(p for p in location.iterdir() if p.suffix == ".json" and p.is_file())
        if not files:
            raise ConfigError(f"{location}: no *.json configuration file in this folder")
    elif location.exists():
        files = [location]
    else:
        raise ConfigError(f"{location}: no such configuration file or folder")

    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for file in files:
        for key, value in _read_file(file, env).items():
            if key in origins:
                raise ConfigError(
                    f"{key}: the option is defined in two configuration files: "
                    f"{origins[key]} and {file}"
                )
            merged[key] = value
            origins[key] = str(file)
    return _build(merged, None, str(location), origins=origins)
