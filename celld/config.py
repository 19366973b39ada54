"""The configuration contract: TOML -> frozen dataclasses, validated.

Owns every key's name, default and check. A bad file is refused whole with a
ConfigError naming the key and the problem in one line; nothing downstream
ever sees an unchecked value. Never reads secrets from the file itself: only
paths to files that hold them.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protocol.reference import parse_ns

DEFAULT_UPSTREAMS = {"docker.io": "https://registry-1.docker.io"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15}


class ConfigError(ValueError):
    """A configuration problem, phrased as `key: problem` for one line of output."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RegistryConfig:
    """A central registry of the platform, tried in the order given."""

    url: str
    username: str | None = None
    password_file: Path | None = None


@dataclass(frozen=True)
class UpstreamConfig:
    """The home registry of images whose `ns` is `host` (docker.io, ghcr.io...)."""

    host: str
    url: str


@dataclass(frozen=True)
class ClusterConfig:
    """Where this cell meets its peers: UDP gossip and the peer API over TCP share
    `listen`; `advertise` is what peers dial (behind NAT or a wildcard listen)."""

    listen: Listen
    advertise: Listen
    seeds: tuple[Listen, ...] = ()
    zone: str = ""


@dataclass(frozen=True)
class PeerConfig:
    """What this cell gives its peers: concurrent piece uploads, and a byte rate cap
    (0: unlimited); and how long it waits on peers that send nothing before it reads
    the rest of a blob from the registries (`stall_timeout`)."""

    upload_slots: int = 4
    upload_rate: int = 0
    stall_timeout: float = 30.0


@dataclass(frozen=True)
class Config:
    name: str
    data_dir: Path
    mirror_listen: Listen = Listen("127.0.0.1", 5050)
    metrics_listen: Listen | None = Listen("127.0.0.1", 5051)
    max_bytes: int = 50 * 2**30
    registries: tuple[RegistryConfig, ...] = ()
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    key_file: Path | None = None
    connect_timeout: float = 2.0
    source_retry_after: float = 30.0
    platform: str = "linux/amd64"  # the image staging picks out of an index
    cluster: ClusterConfig | None = None  # None: the cell runs alone
    peer: PeerConfig = PeerConfig()

    def upstream(self, ns: str | None) -> UpstreamConfig | None:
        return self.upstreams.get(ns or "docker.io")

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"


def default_platform() -> str:
    """This machine's platform in OCI spelling (x86_64 -> amd64, aarch64 -> arm64)."""
    machine = os.uname().machine.lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7", "i686": "386"}.get(
        machine, machine
    )
    return f"linux/{arch}"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "celld"


def parse_size(value: Any, key: str) -> int:
    """'50GiB', '512MB', '10G' or a plain integer of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise ConfigError(
            f"{key}: expected a size like '50GiB' or a number of bytes, got {value!r}"
        )
    number, unit = float(m[1]), (m[2] or "").upper()
    binary = "I" in unit
    letter = unit[:1] if unit not in ("", "B") else unit
    scale = 1024 ** "KMGTP".index(letter) * 1024 if binary else _UNITS[letter]
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"{key}: must be more than 0 bytes, got {value!r}")
    return size


def parse_listen(value: Any, key: str) -> Listen:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected 'host:port', got {value!r}")
    host, _, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: port must be 1-65535, got {port_text!r}")
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        if host != "localhost":
            raise ConfigError(f"{key}: expected an IP address to listen on, got {host!r}") from None
    return Listen(host, int(port_text))


def _url(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a URL string, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{key}: the URL must not carry credentials, a query or a fragment")
    return value.rstrip("/")


def _table(doc: dict, key: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a table")
    return value


def _check_keys(table: dict, allowed: set[str], prefix: str) -> None:
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{prefix}{k}: unknown key (known: {', '.join(sorted(allowed))})")


def _str(table: dict, key: str, prefix: str, default: str | None = None) -> str | None:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{prefix}{key}: expected a non-empty string, got {value!r}")
    return value


def _seconds(table: dict, key: str, default: float, section: str = "sources") -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise ConfigError(f"{section}.{key}: expected seconds between 0 and 3600, got {value!r}")
    return float(value)


def from_dict(doc: dict) -> Config:
    _check_keys(
        doc,
        {
            "cell",
            "cluster",
            "peer",
            "mirror",
            "metrics",
            "store",
            "registry",
            "upstreams",
            "sources",
        },
        "",
    )
    cell = _table(doc, "cell")
    _check_keys(cell, {"name", "data_dir", "platform"}, "cell.")
    platform = _str(cell, "platform", "cell.", default_platform()) or default_platform()
    if not re.fullmatch(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?", platform):
        raise ConfigError(f"cell.platform: expected os/arch[/variant], got {platform!r}")
    name = _str(cell, "name", "cell.", socket.gethostname()) or "cell"
    data_dir = Path(_str(cell, "data_dir", "cell.", str(default_data_dir())) or "").expanduser()

    cluster = _table(doc, "cluster")
    _check_keys(cluster, {"key_file", "listen", "advertise", "seeds", "zone"}, "cluster.")
    key_file = _str(cluster, "key_file", "cluster.")
    cluster_config = _cluster(cluster, key_file)
    peer = _peer(_table(doc, "peer"))

    mirror = _table(doc, "mirror")
    _check_keys(mirror, {"listen"}, "mirror.")
    mirror_listen = parse_listen(mirror.get("listen", "127.0.0.1:5050"), "mirror.listen")

    metrics = _table(doc, "metrics")
    _check_keys(metrics, {"listen", "enabled"}, "metrics.")
    enabled = metrics.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"metrics.enabled: expected true or false, got {enabled!r}")
    metrics_listen = (
        parse_listen(metrics.get("listen", "127.0.0.1:5051"), "metrics.listen") if enabled else None
    )
    if metrics_listen == mirror_listen:
        raise ConfigError("metrics.listen: must differ from mirror.listen")
    if cluster_config is not None and cluster_config.listen in (mirror_listen, metrics_listen):
        raise ConfigError("cluster.listen: must differ from mirror.listen and metrics.listen")

    store = _table(doc, "store")
    _check_keys(store, {"max_bytes"}, "store.")
    max_bytes = parse_size(store.get("max_bytes", "50GiB"), "store.max_bytes")

    raw_registries = doc.get("registry", [])
    if not isinstance(raw_registries, list):
        raise ConfigError("registry: expected [[registry]] tables")
    registries = []
    for i, reg in enumerate(raw_registries):
        prefix = f"registry[{i}]."
        if not isinstance(reg, dict):
            raise ConfigError(f"registry[{i}]: expected a table")
        _check_keys(reg, {"url", "username", "password_file"}, prefix)
        if "url" not in reg:
            raise ConfigError(f"{prefix}url: missing")
        pw = _str(reg, "password_file", prefix)
        if (pw is None) != (reg.get("username") is None):
            raise ConfigError(f"{prefix}username: username and password_file go together")
        if pw is not None and not Path(pw).is_file():
            raise ConfigError(f"{prefix}password_file: no such file: {pw}")
        registries.append(
            RegistryConfig(
                url=_url(reg["url"], prefix + "url"),
                username=_str(reg, "username", prefix),
                password_file=Path(pw) if pw else None,
            )
        )

    sources = _table(doc, "sources")
    _check_keys(sources, {"connect_timeout", "retry_after"}, "sources.")
    connect_timeout = _seconds(sources, "connect_timeout", 2.0)
    retry_after = _seconds(sources, "retry_after", 30.0)

    upstreams = {h: UpstreamConfig(h, u) for h, u in DEFAULT_UPSTREAMS.items()}
    for host, table in _table(doc, "upstreams").items():
        prefix = f'upstreams."{host}".'
        try:
            parse_ns(host)
        except Exception:
            raise ConfigError(f'upstreams."{host}": not a registry host name') from None
        if not isinstance(table, dict):
            raise ConfigError(f'upstreams."{host}": expected a table')
        _check_keys(table, {"url"}, prefix)
        if "url" not in table:
            raise ConfigError(f"{prefix}url: missing")
        upstreams[host] = UpstreamConfig(host, _url(table["url"], prefix + "url"))

    return Config(
        name=name,
        data_dir=data_dir,
        mirror_listen=mirror_listen,
        metrics_listen=metrics_listen,
        max_bytes=max_bytes,
        registries=tuple(registries),
        upstreams=upstreams,
        key_file=Path(key_file) if key_file else None,
        connect_timeout=connect_timeout,
        source_retry_after=retry_after,
        platform=platform,
        cluster=cluster_config,
        peer=peer,
    )


def _cluster(table: dict, key_file: str | None) -> ClusterConfig | None:
    """[cluster] beyond the key: without `listen` the cell runs alone, as before."""
    if "listen" not in table:
        for k in ("advertise", "seeds", "zone"):
            if k in table:
                raise ConfigError(f"cluster.{k}: needs cluster.listen")
        return None
    if key_file is None:
        raise ConfigError("cluster.key_file: required with cluster.listen (peers sign everything)")
    if not Path(key_file).is_file():
        raise ConfigError(f"cluster.key_file: no such file: {key_file}")
    listen = parse_listen(table["listen"], "cluster.listen")
    advertise = parse_listen(table.get("advertise", str(listen)), "cluster.advertise")
    if advertise.host in ("0.0.0.0", "::"):
        raise ConfigError(
            f"cluster.advertise: peers cannot dial {advertise}; give the address they reach"
        )
    raw_seeds = table.get("seeds", [])
    if not isinstance(raw_seeds, list):
        raise ConfigError(f"cluster.seeds: expected a list of 'host:port', got {raw_seeds!r}")
    seeds = tuple(parse_listen(s, f"cluster.seeds[{i}]") for i, s in enumerate(raw_seeds))
    zone = table.get("zone", "")
    if not isinstance(zone, str) or not re.fullmatch(r"[A-Za-z0-9._-]{0,64}", zone):
        raise ConfigError(f"cluster.zone: expected a short label of [A-Za-z0-9._-], got {zone!r}")
    return ClusterConfig(listen=listen, advertise=advertise, seeds=seeds, zone=zone)


def _peer(table: dict) -> PeerConfig:
    _check_keys(table, {"upload_slots", "upload_rate", "stall_timeout"}, "peer.")
    slots = table.get("upload_slots", 4)
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= 1024:
        raise ConfigError(f"peer.upload_slots: expected a number from 1 to 1024, got {slots!r}")
    stall = _seconds(table, "stall_timeout", 30.0, "peer")
    rate = table.get("upload_rate", "0")
    cap = 0 if rate in ("0", 0) else parse_size(rate, "peer.upload_rate")
    return PeerConfig(upload_slots=slots, upload_rate=cap, stall_timeout=stall)


def load(path: Path | None) -> Config:
    """Read and check a config file; None gives the single-cell defaults."""
    if path is None:
        return from_dict({})
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    return from_dict(doc)


def load_cluster_key(config: Config) -> bytes | None:
    """The cluster key (32 bytes, hex in its file), or None when none is configured."""
    if config.key_file is None:
        return None
    try:
        text = config.key_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cluster.key_file: cannot read {config.key_file}: {exc.strerror}"
        ) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("cluster.key_file: expected 32 bytes written as 64 hex digits")
    return key
