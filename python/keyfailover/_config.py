"""`keyfailover serve --config FILE`: several pools in one server, from a TOML file.

    [server]
    admin_tokens_env = "KF_ADMIN_TOKENS"   # optional: the server-wide admin area

    [routes.anthropic]                     # the route's name: its pool's name
    path = "/anthropic"                    # default "/<name>"
    provider = "anthropic"
    keys_env = "ANTHROPIC_KEYS"            # or keys_file = "...", or keys = [...]

Loading checks everything and names the file, the route and the field in its
error. Reloading (SIGHUP, or the config or a keys file changing) builds the new
routes beside the old ones and swaps them in whole; a route whose pool settings
(state, namespace) are unchanged keeps its pool, so its keys keep their state
(a new strategy is set on it). The kept pools' new keys go in service together
once the routes are swapped: a config with an error, or a reload failing in
any route, changes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
import sys
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keyfailover._native import (
    ConfigError,
    FailoverClient,
    Gateway,
    Key,
    KeyPool,
    Server,
    _PreparedReload,
    parse_keys,
)
from keyfailover._reload import FileWatcher, read_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

if TYPE_CHECKING:
    from keyfailover.asgi import FailoverProxy

log = logging.getLogger("keyfailover")

Keys = list[str | Key] | dict[str, str | Key]

DEFAULT_UPSTREAMS = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com",
    "gemini": "https://generativelanguage.googleapis.com",
}
# Azure OpenAI has no public endpoint of its own: each resource has one.
PROVIDERS = (*DEFAULT_UPSTREAMS, "azure_openai")
STRATEGIES = ("ordered", "round_robin", "least_loaded", "headroom")

SERVER_FIELDS = {"admin_tokens_env"}
ROUTE_FIELDS = {
    "path",
    "provider",
    "upstream",
    "keys_env",
    "keys_file",
    "keys",
    "strategy",
    "state",
    "namespace",
    "client_tokens_env",
    "allow_byok",
    "max_body_bytes",
    "body_timeout",
    "timeout",
    "connect_timeout",
    "http2",
}
# The forms of a Redis URL the pools take (checked here, so that `--check` connects to none).
# A route's path: a URL path as the request line carries it (RFC 3986's
# characters, no escapes, no query).
ROUTE_PATH = re.compile(r"/[A-Za-z0-9._~!$&'()*+,;=:@/-]*")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+unix://")
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclasses.dataclass(frozen=True)
class RouteConfig:
    name: str
    path: str
    provider: str
    upstream: str
    keys: Keys = dataclasses.field(repr=False, compare=False)
    keys_file: Path | None
    strategy: str
    state: str | None = dataclasses.field(repr=False)  # a Redis URL may hold a password
    namespace: str
    client_tokens: tuple[str, ...] | None = dataclasses.field(repr=False)
    allow_byok: bool
    max_body_bytes: int
    body_timeout: float
    timeout: float
    connect_timeout: float
    http2: bool

    def pool_settings(self) -> tuple[str | None, str]:
        """What a pool is built with, besides its keys and strategy (which a
        reload changes in place)."""
        return (self.state, self.namespace)


@dataclasses.dataclass(frozen=True)
class Config:
    path: Path
    routes: tuple[RouteConfig, ...]
    admin_tokens: tuple[str, ...] | None = dataclasses.field(repr=False)

    def files(self) -> list[Path]:
        """The files the config reads: itself and its keys files."""
        return [self.path, *(r.keys_file for r in self.routes if r.keys_file is not None)]


def default_upstream(provider: str, keys: Keys, given: str | None) -> str | None:
    """Where a pool's requests go: `given`, else the provider's public API, else
    (Azure OpenAI) the first key's own endpoint when every key has one."""
    if given:
        return given
    if provider in DEFAULT_UPSTREAMS:
        return DEFAULT_UPSTREAMS[provider]
    listed = list(keys.values()) if isinstance(keys, dict) else list(keys)
    endpoints = [key.base_url if isinstance(key, Key) else None for key in listed]
    return str(endpoints[0]) if endpoints and all(endpoints) else None


class _Where:
    """Builds error messages naming the file, the route and the field."""

    def __init__(self, path: Path, route: str | None = None) -> None:
        self.path = path
        self.route = route

    def error(self, field: str | None, message: str) -> ConfigError:
        parts = [echo_file(str(self.path))]
        if self.route is not None:
            parts.append(f"route {echo(self.route)!r}")
        if field is not None:
            parts.append(echo(field))
        return ConfigError(": ".join([*parts, message]))


def unset_variable(var: str) -> str:
    """Why `var` gave nothing, naming it only if it looks like a variable's name: a key or
    token given where its name belongs must not be printed."""
    # Long and not in capitals: a key such as Groq's (`gsk_...`) passes for a name.
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", var) and (len(var) <= 26 or var.isupper()):
        return f"environment variable {var} is not set"
    return "is not an environment variable's name (a key or token given where a name belongs?)"


def _tokens(where: _Where, field: str, var: Any, environ: dict[str, str]) -> tuple[str, ...]:
    if not isinstance(var, str) or not var:
        raise where.error(field, "must name an environment variable")
    value = environ.get(var)
    if value is None:
        raise where.error(field, unset_variable(var))
    tokens = tuple(t.strip() for t in re.split(r"[,\n]", value) if t.strip())
    if not tokens:
        raise where.error(field, f"environment variable {var} holds no tokens")
    return tokens


def _shown(value: object) -> str:
    """`value` as an error quotes it: masked when longer than any name or setting, as a key
    written in the wrong field would be (an error is printed and logged; a key never is)."""
    text = repr(value)
    return f"{text[:5]}...{text[-5:]}" if len(text) > 26 else text


def echo(text: str) -> str:
    """A name or file as a message shows it: masked as a key's hint is when it could be a
    key given in the wrong place (longer than names are, with no '/', '.' or ':' of a file,
    host or URL in it), else as written."""
    if len(text) > 26 and not re.search(r"[/.:]", text):
        return f"{text[:4]}...{text[-4:]}"
    return text


def masked_words(text: str) -> str:
    """`text` with every run of key characters (letters, digits, `-`, `_`) longer than
    names are masked as a key's hint is (as the core's `masked_words`)."""
    return re.sub(r"[A-Za-z0-9_-]{27,}", lambda m: f"{m.group()[:4]}...{m.group()[-4:]}", text)


def echo_file(path: str) -> str:
    """A file's path as a message shows it: its name as `echo` shows one (a key given
    where a file belongs), its directories as written."""
    directory, slash, name = path.rpartition("/")
    return f"{directory}{slash}{echo(name)}"


def echo_path(path: str) -> str:
    """A route's path as a message shows it: each segment as `echo` shows a name."""
    return "/".join(echo(segment) for segment in path.split("/"))


def _typed(where: _Where, table: dict[str, Any], field: str, kind: type, default: Any) -> Any:
    """`table[field]` if it is a `kind` (an int does for a float; a bool is no int),
    else `default` when absent."""
    if field not in table:
        return default
    value = table[field]
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise where.error(field, f"must be {_KIND_NAMES[kind]}, not {_shown(value)}")
    return value


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def _keys(
    where: _Where, table: dict[str, Any], base: Path, mode: int, environ: dict[str, str]
) -> tuple[Keys, Path | None]:
    given = [f for f in ("keys_env", "keys_file", "keys") if f in table]
    if len(given) != 1:
        raise where.error(
            None,
            "needs exactly one of keys_env, keys_file and keys"
            + (f" (has {', '.join(given)})" if given else ""),
        )
    field = given[0]
    value = table[field]
    try:
        if field == "keys_env":
            if not isinstance(value, str) or not value:
                raise where.error(field, "must name an environment variable")
            text = environ.get(value)
            if text is None:
                raise where.error(field, unset_variable(value))
            source = f"environment variable {value}"
            return parse_keys(text, source=source, separators=",\n"), None
        if field == "keys_file":
            if not isinstance(value, str) or not value:
                raise where.error(field, "must be a path")
            path = base / value
            try:
                text = read_text(path)
            except OSError as exc:
                shown = echo_file(str(path))
                raise where.error(field, f"cannot read {shown!r}: {exc.strerror}") from None
            except ValueError as exc:
                raise where.error(field, f"{echo_file(str(path))!r}: {exc}") from None
            return parse_keys(text, source=f"keys file {str(path)!r}"), path
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise where.error(
                field,
                f"keys written in the config need it readable by its owner only "
                f"(chmod 600 {where.path}; it is {stat.filemode(mode)}), "
                "or use keys_env or keys_file",
            )
        if isinstance(value, list) and all(isinstance(k, str) for k in value):
            lines = value
        elif isinstance(value, dict) and all(isinstance(k, str) for k in value.values()):
            lines = [f"{label}={key}" for label, key in value.items()]
        else:
            raise where.error(field, "must be a list of keys or a table of label = key")
        return parse_keys("\n".join(lines), source="keys"), None
    except ConfigError as exc:
        if str(exc).startswith(str(where.path)):
            raise
        raise where.error(field, str(exc)) from None


def _check_upstream(where: _Where, upstream: str) -> None:
    """The checks of a pool's base URL, naming the field (the URL is not shown: it
    may hold a password)."""
    url = urllib.parse.urlsplit(upstream)
    if url.username is not None or url.password is not None:
        raise where.error(
            "upstream", "must not contain credentials (user:password@): keyfailover sends the keys"
        )
    if url.scheme not in ("http", "https") or not url.netloc or url.query or url.fragment:
        raise where.error("upstream", "must be an http or https URL without query or fragment")


def _route(
    where: _Where, table: Any, base: Path, mode: int, environ: dict[str, str]
) -> RouteConfig:
    if not isinstance(table, dict):
        raise where.error(None, "must be a table")
    unknown = sorted(set(table) - ROUTE_FIELDS)
    if unknown:
        raise where.error(
            unknown[0], f"unknown field (expected one of {', '.join(sorted(ROUTE_FIELDS))})"
        )
    name = where.route or ""
    path = _typed(where, table, "path", str, f"/{name}")
    if not ROUTE_PATH.fullmatch(path) or "//" in path:
        raise where.error("path", f"must be an absolute path such as /{name}, not {_shown(path)}")
    path = path.rstrip("/") or "/"
    if "_keyfailover" in path.split("/"):
        raise where.error("path", "/_keyfailover is the admin area's: a route cannot be there")
    provider = _typed(where, table, "provider", str, "anthropic")
    if provider not in PROVIDERS:
        raise where.error(
            "provider", f"unknown provider {_shown(provider)} (one of {', '.join(PROVIDERS)})"
        )
    keys, keys_file = _keys(where, table, base, mode, environ)
    try:
        # What a pool checks (labels, duplicates, base_url=), on a throwaway local
        # pool: a reload with an error is refused before any pool changes.
        KeyPool(keys)
    except ConfigError as exc:
        field = next(f for f in ("keys_env", "keys_file", "keys") if f in table)
        raise where.error(field, str(exc)) from None
    given_upstream = _typed(where, table, "upstream", str, None)
    if given_upstream is not None:
        _check_upstream(where, given_upstream)
    upstream = default_upstream(provider, keys, given_upstream)
    if upstream is None:
        raise where.error(
            "upstream",
            f"provider {provider} needs upstream (the resource's endpoint) "
            "or base_url=URL on every key",
        )
    strategy = _typed(where, table, "strategy", str, "ordered")
    if strategy not in STRATEGIES:
        raise where.error(
            "strategy", f"unknown strategy {_shown(strategy)} (one of {', '.join(STRATEGIES)})"
        )
    tokens = None
    if "client_tokens_env" in table:
        tokens = _tokens(where, "client_tokens_env", table["client_tokens_env"], environ)
        listed = keys.items() if isinstance(keys, dict) else enumerate(keys)
        for label, key in listed:
            if (key.value if isinstance(key, Key) else key) in tokens:
                label = label if isinstance(keys, dict) else f"key-{label}"
                raise where.error("client_tokens_env", f"a token is the route's key {label}")
    max_body = _typed(where, table, "max_body_bytes", int, 32 * 1024 * 1024)
    if not 0 <= max_body <= 2**53:
        raise where.error("max_body_bytes", "must be a number of bytes from 0 to 2**53")
    timeout = _typed(where, table, "timeout", float, 600.0)
    connect_timeout = _typed(where, table, "connect_timeout", float, 10.0)
    body_timeout = _typed(where, table, "body_timeout", float, 30.0)
    for field, value in (
        ("timeout", timeout),
        ("connect_timeout", connect_timeout),
        ("body_timeout", body_timeout),
    ):
        if not 0.001 <= value <= 1e9:
            raise where.error(field, "must be a number of seconds from 0.001 to 1e+09")
    state = _typed(where, table, "state", str, None)
    if state is not None and state not in ("local", "shm"):
        if not state.startswith(REDIS_SCHEMES):
            raise where.error("state", 'must be "shm" or a redis://, rediss:// or unix:// URL')
        try:
            url = urllib.parse.urlsplit(state)
            host = url.hostname
        except ValueError as exc:
            raise where.error("state", f"not a URL: {exc}") from None
        unix = url.scheme in ("unix", "redis+unix")
        if unix and not url.path:
            raise where.error("state", "a unix:// URL needs the socket's path")
        if not unix and not host:
            raise where.error("state", "a Redis URL needs a host")
    namespace = _typed(where, table, "namespace", str, name)
    if not namespace or any(c.isspace() or not c.isprintable() for c in namespace):
        raise where.error("namespace", f"must be a name without spaces, not {_shown(namespace)}")
    return RouteConfig(
        name=name,
        path=path,
        provider=provider,
        upstream=upstream,
        keys=keys,
        keys_file=keys_file,
        strategy=strategy,
        state=state,
        namespace=namespace,
        client_tokens=tokens,
        allow_byok=_typed(where, table, "allow_byok", bool, False),
        max_body_bytes=max_body,
        body_timeout=body_timeout,
        timeout=timeout,
        connect_timeout=connect_timeout,
        http2=_typed(where, table, "http2", bool, True),
    )


def load_config(path: str | os.PathLike[str], *, environ: dict[str, str] | None = None) -> Config:
    """Reads and checks the config at `path`; ConfigError naming file, route and field."""
    path = Path(path)
    environ = dict(os.environ) if environ is None else environ
    where = _Where(path)
    try:
        raw = path.read_bytes()
        mode = path.stat().st_mode
    except OSError as exc:
        raise where.error(None, f"cannot read it: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise where.error(None, f"not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"server", "routes"})
    if unknown:
        raise where.error(unknown[0], "unknown table (expected [server] and [routes.NAME])")
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise where.error("server", "must be a table")
    unknown = sorted(set(server) - SERVER_FIELDS)
    if unknown:
        raise where.error(f"server.{echo(unknown[0])}", "unknown field (expected admin_tokens_env)")
    admin = None
    if "admin_tokens_env" in server:
        admin = _tokens(where, "server.admin_tokens_env", server["admin_tokens_env"], environ)
    tables = data.get("routes")
    if not isinstance(tables, dict) or not tables:
        raise where.error("routes", "needs at least one [routes.NAME] table")
    routes = []
    for name, table in tables.items():
        if not NAME.match(name):
            raise where.error(
                f"routes.{echo(name)}", "a route's name is letters, digits, '_', '-', '.'"
            )
        routes.append(_route(_Where(path, name), table, path.parent, mode, environ))
    paths: dict[str, str] = {}
    for route in routes:
        if route.path in paths:
            raise _Where(path, route.name).error(
                "path", f"{route.path} is route {paths[route.path]!r}'s too"
            )
        paths[route.path] = route.name
    if "/" in paths and len(routes) > 1:
        raise _Where(path, paths["/"]).error(
            "path",
            "/ beside other routes would take the server-wide admin area (/_keyfailover/): "
            "with several routes, each needs a prefix",
        )
    return Config(path=path, routes=tuple(routes), admin_tokens=admin)


@dataclasses.dataclass
class _Built:
    config: RouteConfig
    pool: KeyPool
    proxy: FailoverProxy


class Routes:
    """The routes of a config as the server runs them, rebuilt on reload."""

    def __init__(
        self, config: Config, *, default_state: str | None = None, local: bool = False
    ) -> None:
        """`local`: every pool keeps its keys' states in this process, whatever its
        `state` (for `--check`: no shared memory is opened, no Redis connected)."""
        self.default_state = default_state
        self.local = local
        self.config = config
        self.built, _ = self._build(config, {})

    def _build(
        self, config: Config, old: dict[str, _Built]
    ) -> tuple[dict[str, _Built], list[tuple[str, _PreparedReload]]]:
        """The routes of `config`, keeping what `old` has of them, and the reloads
        of the pools kept (by route), made ready: committed once the routes are
        in service; dropped, nothing of `old` changed."""
        from keyfailover.asgi import FailoverProxy

        built: dict[str, _Built] = {}
        reloads: list[tuple[RouteConfig, KeyPool, str | None]] = []
        for route in config.routes:
            where = _Where(config.path, route.name)
            previous = old.get(route.name)
            state = route.state if route.state is not None else self.default_state
            if self.local:
                state = None
            if (
                previous is not None
                and previous.config == route
                and config.admin_tokens == self.config.admin_tokens
            ):
                # The same route: keep its client (and its upstream connections)
                # and gateway (and the dashboard's history); only keys may change.
                reloads.append((route, previous.pool, None))
                built[route.name] = _Built(route, previous.pool, previous.proxy)
                continue
            try:
                if (
                    previous is not None
                    and previous.config.pool_settings() == route.pool_settings()
                ):
                    # Kept, key states and all; its keys and strategy change on commit.
                    pool = previous.pool
                    strategy = route.strategy if route.strategy != pool.strategy else None
                    reloads.append((route, pool, strategy))
                else:
                    pool = KeyPool(
                        route.keys, state=state, namespace=route.namespace, strategy=route.strategy
                    )
                client = FailoverClient(
                    pool,
                    base_url=route.upstream,
                    provider=route.provider,
                    timeout=route.timeout,
                    connect_timeout=route.connect_timeout,
                    http2=route.http2,
                    name=route.name,
                )
                proxy = FailoverProxy(
                    client,
                    client_tokens=route.client_tokens,
                    allow_byok=route.allow_byok,
                    max_body_bytes=route.max_body_bytes,
                    body_timeout=route.body_timeout,
                    admin_tokens=config.admin_tokens,
                    reload=self._keys_of(route.name),
                )
            except ConfigError as exc:
                raise where.error(None, str(exc)) from None
            built[route.name] = _Built(route, pool, proxy)
        # The keys were checked as the config was loaded; these fail only when
        # shared memory has no room for new keys.
        prepared = []
        for route, pool, strategy in reloads:
            try:
                prepared.append((route.name, pool._prepare_reload(route.keys, strategy=strategy)))
            except ConfigError as exc:
                raise _Where(config.path, route.name).error(None, str(exc)) from None
        return built, prepared

    def _keys_of(self, name: str) -> Callable[[], Keys]:
        """The reload hook of a route's admin area: its keys as the config says now."""

        def keys() -> Keys:
            config = load_config(self.config.path)
            for route in config.routes:
                if route.name == name:
                    return route.keys
            raise ConfigError(f"{config.path}: route {name!r} is not in the config any more")

        return keys

    def server_routes(self) -> list[tuple[str, Gateway]]:
        return _server_routes(self.built)

    def reload(self, server: Server) -> str:
        """Loads the config again and swaps the new routes in; what changed, in words.
        ConfigError (and nothing changes) when the config has an error."""
        config = load_config(self.config.path)
        old = self.built
        # Pools kept keep their state in place; their new keys go in service
        # with the new routes, all or (on an error) none.
        built, prepared = self._build(config, old)
        server.set_routes(_server_routes(built))
        changes = [(name, p.commit()["summary"]) for name, p in prepared]
        self.config, self.built = config, built
        added = [n for n in built if n not in old]
        removed = [n for n in old if n not in built]
        kept = [n for n in built if n in old and old[n].pool is built[n].pool]
        parts = [f"{len(built)} route{'' if len(built) == 1 else 's'}"]
        if added:
            parts.append("added " + ", ".join(added))
        if removed:
            parts.append("removed " + ", ".join(removed))
        renewed = [n for n in built if n in old and n not in kept]
        if renewed:
            parts.append("new pools for " + ", ".join(renewed))
        parts += [f"{name} [{summary}]" for name, summary in changes if summary != "no change"]
        return "; ".join(parts)

    def describe(self) -> list[str]:
        """One line per route, for the log: where it forwards, with which keys (hints)."""
        lines = []
        for b in self.built.values():
            keys = ", ".join(f"{k['label']} {k['hint']}" for k in b.pool.snapshot())
            count = f"{len(b.pool)} key" + ("" if len(b.pool) == 1 else "s")
            lines.append(
                f"route {b.config.path} ({b.config.name}, {b.config.provider}): forwarding to "
                f"{b.config.upstream} with {count} ({keys}), key states {b.pool.state_backend}"
            )
        return lines


def _server_routes(built: dict[str, _Built]) -> list[tuple[str, Gateway]]:
    """(prefix, gateway) pairs for the native server ("" for the route at /)."""
    return [
        ("" if b.config.path == "/" else b.config.path, b.proxy.gateway) for b in built.values()
    ]


class ConfigReloader(FileWatcher):
    """Reloads the routes on SIGHUP and when the config or a keys file it names changes."""

    name = "keyfailover-config"

    server: Server  # set before the first reload

    def __init__(self, routes: Routes, *, interval: float = 2.0) -> None:
        self.routes = routes
        super().__init__(interval=interval)

    def files(self) -> list[Path]:
        return self.routes.config.files()

    def _reload(self, why: str) -> None:
        try:
            summary = self.routes.reload(self.server)
        except ConfigError as exc:
            log.error("not reloading the config (%s): %s; the routes in service stay", why, exc)
        else:
            log.info("reloaded the config (%s): %s", why, summary)
        self._seen = self._stamps()  # the files of the config now in service
