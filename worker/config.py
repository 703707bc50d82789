"""Fleet configuration: one YAML file validated into typed objects.

The file is found from ``--config``, else ``$VMVAULT_CONFIG``, else ``./vmvault.yaml``.
Every problem is reported at once, one line each, naming the file, the key path
(``domains.web1.qmp``) and what is wrong; nothing runs on a bad config.
Credentials do not belong here: S3 uses the standard AWS credential chain, the
repository passphrase and the broker password are read from the files the config names.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, quote, urlparse, urlsplit, urlunsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from vmvault.storage.format import NAME_PATTERN
from vmvault.storage.locks import DEFAULT_GRACE
from vmvault.worker.notify_config import NotificationsConfig

if TYPE_CHECKING:
    from vmvault.storage.repository import Repository

DEFAULT_CONFIG_NAME = "vmvault.yaml"
CONFIG_ENV = "VMVAULT_CONFIG"

# Names (domains, disks, hosts, schedules) use the repository's alphabet (storage/format.py).
_NAME_RE = re.compile(NAME_PATTERN)

Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError(f"must be an absolute path, got {str(path)!r}")
    return path


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]


class ConfigError(Exception):
    """The configuration file is missing or invalid. Not retryable: fix the file."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RepositoryConfig(_Strict):
    """Where backups live: ``file:///path`` or ``s3://bucket/prefix``."""

    url: str
    endpoint_url: str | None = None
    region: str | None = None
    passphrase_file: Path | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        # storage.backends imports boto3 only when a backend is opened: cheap here.
        from vmvault.storage.backends import check_url
        from vmvault.storage.errors import StorageError

        try:
            check_url(url)
        except StorageError as err:
            raise ValueError(str(err)) from None
        return url

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, url: str | None) -> str | None:
        if url is not None and urlparse(url).scheme not in ("http", "https"):
            raise ValueError(f"bad endpoint URL {url!r}: use http:// or https://")
        return url

    @model_validator(mode="after")
    def _s3_only_options(self) -> RepositoryConfig:
        if urlparse(self.url).scheme != "s3":
            for key in ("endpoint_url", "region"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to s3:// repositories only")
        return self

    # The config section errors name (``repositories.NAME`` for those; see FleetConfig).
    _where: str = PrivateAttr(default="repository")

    def read_passphrase(self) -> bytes | None:
        """The repository passphrase from ``passphrase_file`` (trailing newline dropped).

        ``ConfigError`` when the file cannot be read or holds nothing: an empty
        passphrase would otherwise read as "no passphrase configured".
        """
        if self.passphrase_file is None:
            return None
        try:
            data = self.passphrase_file.read_bytes()
        except OSError as err:
            raise ConfigError(
                [
                    f"{self._where}.passphrase_file: cannot read {self.passphrase_file}: "
                    f"{err.strerror}"
                ]
            ) from err
        passphrase = data.rstrip(b"\r\n")
        if not passphrase:
            raise ConfigError(
                [
                    f"{self._where}.passphrase_file: passphrase file {self.passphrase_file} is "
                    "empty: write the passphrase into it"
                ]
            )
        return passphrase

    def open(self, concurrency: int | None = None) -> Repository:
        """Open the configured repository; ``concurrency`` sizes its thread and connection pool."""
        # Imported here: the storage stack (boto3) is not needed to validate a config.
        from vmvault.storage.repository import DEFAULT_CONCURRENCY, open_repository

        return open_repository(
            self.url,
            endpoint_url=self.endpoint_url,
            region=self.region,
            passphrase=self.read_passphrase(),
            concurrency=concurrency or DEFAULT_CONCURRENCY,
        )


_LAUNCH_PLACEHOLDER_RE = re.compile(r"\{(qmp|disk:[^{}]*)\}")
# Added by restore itself; a launch description that carries them could not boot normally.
_LAUNCH_RESERVED_ARGS = ("-S", "-incoming", "-daemonize")


class LaunchConfig(_Strict):
    """How restore starts this domain's QEMU: its argv with placeholders (see docs/restore.md).

    ``{qmp}`` becomes the domain's ``qmp`` socket path and ``{disk:NAME}`` the path of the
    restored image of disk NAME; every other character, braces included, is passed as is.
    """

    argv: list[str] = Field(min_length=1)
    image_dir: Path | None = None

    @field_validator("argv")
    @classmethod
    def _check_argv(cls, argv: list[str]) -> list[str]:
        if not argv[0] or argv[0].startswith("-"):
            raise ValueError("argv[0] must be the QEMU binary (e.g. qemu-system-x86_64)")
        qmp_seen = False
        for arg in argv:
            if arg in _LAUNCH_RESERVED_ARGS:
                raise ValueError(f"argv must not contain {arg!r}: restore adds it when needed")
            for match in _LAUNCH_PLACEHOLDER_RE.finditer(arg):
                token = match.group(1)
                if token == "qmp":
                    qmp_seen = True
                elif not _NAME_RE.match(token.removeprefix("disk:")):
                    raise ValueError(f"bad placeholder {match.group(0)!r}: use {{disk:NAME}}")
        if not qmp_seen:
            raise ValueError(
                "argv needs a {qmp} placeholder (e.g. -qmp unix:{qmp},server=on,wait=off)"
            )
        return argv

    @field_validator("image_dir")
    @classmethod
    def _absolute_image_dir(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"image_dir must be an absolute path, got {str(path)!r}")
        return path

    def disk_names(self) -> list[str]:
        """The disk names the argv has ``{disk:NAME}`` placeholders for, in argv order."""
        names: list[str] = []
        for arg in self.argv:
            for match in _LAUNCH_PLACEHOLDER_RE.finditer(arg):
                name = match.group(1).removeprefix("disk:")
                if match.group(1) != "qmp" and name not in names:
                    names.append(name)
        return names

    def render(self, qmp: Path, images: dict[str, Path]) -> list[str]:
        """The argv with placeholders replaced; ``KeyError`` names a disk without an image."""

        def substitute(match: re.Match[str]) -> str:
            token = match.group(1)
            if token == "qmp":
                return str(qmp)
            return str(images[token.removeprefix("disk:")])

        return [_LAUNCH_PLACEHOLDER_RE.sub(substitute, arg) for arg in self.argv]


class GuestHook(_Strict):
    """A command run in the guest through the agent's ``guest-exec`` (docs/backup.md)."""

    argv: list[str] = Field(min_length=1)
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("argv")
    @classmethod
    def _absolute_command(cls, argv: list[str]) -> list[str]:
        if not argv[0].startswith("/"):
            raise ValueError(f"argv[0] must be an absolute path in the guest, got {argv[0]!r}")
        return argv


class LibvirtConfig(_Strict):
    """A domain libvirt manages: backed up through its checkpoint and backup API
    (worker/libvirt_backup.py), never through QMP."""

    uri: str = "qemu:///system"
    # The libvirt domain name; None = the config's key (``domains.<name>``).
    name: str | None = Field(default=None, min_length=1)

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, uri: str) -> str:
        if not re.match(r"^[a-z][a-z0-9+]*://", uri):
            raise ValueError(f"bad libvirt URI {uri!r}: use e.g. qemu:///system")
        return uri


class DomainConfig(_Strict):
    """One VM: which host's worker owns it and how to reach its QEMU (``qmp``) or the
    libvirt that manages it (``libvirt``): exactly one of the two."""

    host: Name
    qmp: Path | None = None
    libvirt: LibvirtConfig | None = None
    disks: list[Name] | None = None
    launch: LaunchConfig | None = None
    # Application-consistent backups through qemu-guest-agent (worker/freeze.py).
    guest_agent: AbsolutePath | None = None
    freeze_mountpoints: list[str] | None = Field(default=None, min_length=1)
    require_freeze: bool = False
    # How long guest-fsfreeze-freeze may take (it flushes the guest's dirty data first).
    freeze_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    pre_freeze: GuestHook | None = None
    post_thaw: GuestHook | None = None

    @field_validator("qmp")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_absolute():
            raise ValueError(f"QMP socket path must be absolute, got {str(path)!r}")
        return path

    @field_validator("freeze_mountpoints")
    @classmethod
    def _absolute_mountpoints(cls, paths: list[str] | None) -> list[str] | None:
        for path in paths or []:
            if not path.startswith("/"):
                raise ValueError(f"mountpoints must be absolute paths in the guest, got {path!r}")
        return paths

    @model_validator(mode="after")
    def _qmp_or_libvirt(self) -> DomainConfig:
        if (self.qmp is None) == (self.libvirt is None):
            raise ValueError(
                "set exactly one of qmp (the QEMU's QMP socket path) and libvirt "
                "({uri, name} of a domain libvirt manages)"
            )
        if self.libvirt is not None:
            # libvirt owns the QEMU: its disks, its start and its monitor.
            for key in ("launch", "guest_agent"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} applies to qmp domains only, not libvirt ones")
        return self

    def qmp_socket(self, domain: str) -> Path:
        """The QMP socket of a QMP domain; ``ConfigError`` for a libvirt domain, whose
        QEMU only libvirt may talk to."""
        if self.qmp is None:
            raise ConfigError(
                [
                    f"domains.{domain}: this operation needs a QMP domain (domains.{domain}.qmp);"
                    f" {domain} is managed by libvirt"
                ]
            )
        return self.qmp

    def libvirt_name(self, domain: str) -> str:
        """The libvirt domain name of a libvirt domain (``libvirt.name``, else the key)."""
        assert self.libvirt is not None
        return self.libvirt.name or domain

    @model_validator(mode="after")
    def _freeze_needs_agent(self) -> DomainConfig:
        if self.guest_agent is None:
            for key in ("freeze_mountpoints", "pre_freeze", "post_thaw"):
                if getattr(self, key) is not None:
                    raise ValueError(f"{key} needs guest_agent (the QGA socket path)")
            if self.require_freeze:
                raise ValueError("require_freeze needs guest_agent (the QGA socket path)")
        return self


class RetentionPolicy(_Strict):
    """How many backups each rule keeps (restic / Proxmox Backup Server semantics)."""

    keep_last: int | None = Field(default=None, ge=1)
    keep_hourly: int | None = Field(default=None, ge=1)
    keep_daily: int | None = Field(default=None, ge=1)
    keep_weekly: int | None = Field(default=None, ge=1)
    keep_monthly: int | None = Field(default=None, ge=1)
    keep_yearly: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _not_empty(self) -> RetentionPolicy:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("a retention policy needs at least one keep_* rule")
        return self


class NamedRepositoryConfig(RepositoryConfig):
    """A further repository (``repositories:``), e.g. an off-site copy of the primary:
    the same keys, plus the retention ``prune --repository NAME`` applies there."""

    retention: RetentionPolicy | None = None


def _valid_cron(expr: str) -> str:
    # Imported here: only configs with schedules need it, and it costs CLI start-up.
    from croniter import croniter

    if not croniter.is_valid(expr):
        raise ValueError(f"bad cron expression {expr!r} (want 5 fields, e.g. '0 2 * * *')")
    return expr


class ScheduleConfig(_Strict):
    """A cron schedule of backups for the domains matching ``domains`` (names or globs)."""

    cron: str
    domains: list[str] = Field(min_length=1)
    retention: RetentionPolicy | None = None
    # Jobs of one slot start at deterministic offsets within this window (seconds), so a
    # 02:00 schedule does not hit every host at 02:00:00. None = the scheduler default.
    spread_seconds: int | None = Field(default=None, ge=0, le=86400)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, expr: str) -> str:
        return _valid_cron(expr)


class CopyJobConfig(_Strict):
    """A cron schedule of copies of the domains matching ``domains`` to repository ``to``
    (``vmvault copy`` as a fleet job on the storage queue), then ``retention`` there."""

    cron: str
    domains: list[str] = Field(min_length=1)
    to: Name
    # Where from: a key of ``repositories``; None = the primary repository.
    source: Name | None = Field(default=None, alias="from")
    retention: RetentionPolicy | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, expr: str) -> str:
        return _valid_cron(expr)


class RestoreTestConfig(_Strict):
    """A verify job's restore tests: the latest backup of ``sample`` of its domains (those
    with a ``launch`` description) restored on the domain's host and started isolated and
    paused (``worker/restore_test.py``)."""

    sample: int = Field(default=1, ge=1, le=1000)
    # paused: started with -S (the CPUs never run); agent: booted, and its guest agent
    # must answer guest-ping (domains without guest_agent are then not sampled).
    boot: Literal["paused", "agent"] = "paused"
    timeout_seconds: float = Field(default=120.0, ge=1, le=3600)


class VerifyJobConfig(_Strict):
    """A cron schedule of verifications of the backups of the domains matching ``domains``.

    ``outdated_after`` (days), as Proxmox Backup Server's: a backup whose last successful
    verification is younger is skipped; never-verified and failed ones are always due.
    None: every backup is verified every time.
    """

    cron: str
    domains: list[str] = Field(min_length=1)
    read_data: bool = False
    outdated_after: int | None = Field(default=None, ge=0, le=36500)
    restore_test: RestoreTestConfig | None = None

    @field_validator("cron")
    @classmethod
    def _check_cron(cls, expr: str) -> str:
        return _valid_cron(expr)


class HostConfig(_Strict):
    """Per-hypervisor limits; hosts not listed get the defaults."""

    max_concurrent: int = Field(default=1, ge=1, le=1024)


class BackupSettings(_Strict):
    """How backups protect the guest and bound their waits (durations in seconds)."""

    # Every NBD request and handshake, and every QMP command, waits at most this long for
    # QEMU: a frozen QEMU ends a job with a message instead of stalling it.
    io_timeout_seconds: float = Field(default=120.0, ge=1, le=3600)
    # QEMU's copy-before-write timeout (``cbw-timeout``): a guest write waits at most this
    # long for its old data to reach the scratch image; after that the backup breaks,
    # never the write.
    fleece_timeout_seconds: int = Field(default=5, ge=1, le=600)
    # A backup does not start when state_dir has less free space than this (MiB).
    min_free_mib: int = Field(default=64, ge=1)
    # Refuse to start (instead of warning) when state_dir cannot hold the most the
    # fleecing scratch images can grow to (every protected byte overwritten).
    require_fleece_space: bool = False
    # Checkpoints that another repository's backups of the same domain took are kept by
    # this repository's trims for this many days (that repository diffs from them).
    foreign_checkpoint_days: int = Field(default=35, ge=1, le=3650)


class SchedulerSettings(_Strict):
    """How the scheduler and the job queue behave (all durations in seconds)."""

    tick_seconds: float = Field(default=15.0, gt=0, le=3600)
    spread_seconds: int = Field(default=0, ge=0, le=86400)
    gc_interval_seconds: int | None = Field(default=86400, ge=60)
    lease_seconds: float = Field(default=30.0, gt=0, le=3600)
    lock_ttl_seconds: float = Field(default=60.0, gt=0, le=3600)
    job_time_limit_seconds: int = Field(default=6 * 3600, ge=5)
    # A message whose worker died unacked is redelivered after this long (Redis transport).
    visibility_timeout_seconds: int = Field(default=7 * 3600, ge=5)
    # How often a worker looks for what a killed job left in its host's QEMUs and state_dir.
    reaper_interval_seconds: float = Field(default=60.0, ge=1, le=86400)

    @model_validator(mode="after")
    def _redelivery_after_limit(self) -> SchedulerSettings:
        # A visibility timeout shorter than a job would redeliver jobs that are still running.
        if self.visibility_timeout_seconds <= self.job_time_limit_seconds:
            raise ValueError(
                "visibility_timeout_seconds must be longer than job_time_limit_seconds"
            )
        return self


# The spellings Celery's Redis result backend accepts (celery.backends.redis).
_SSL_CERT_REQS = ("required", "optional", "none", "CERT_REQUIRED", "CERT_OPTIONAL", "CERT_NONE")


class WorkerPolicy(_Strict):
    """What a worker accepts from the job queue: the broker is a channel, not an authority.

    Anyone who can write to Redis can enqueue a job; these limits hold whatever the message
    says (docs/fleet.md, "Trust boundary"). The in-process CLI is not limited by them.
    """

    # Directories queued restores may write under; None = <state_dir>/images and every
    # domain's launch.image_dir. An empty list refuses every queued restore.
    restore_roots: list[AbsolutePath] | None = None
    allow_force_from_queue: bool = False
    # Retention a queued prune may apply to any domain, besides each schedule's own.
    prune_policies: list[RetentionPolicy] = Field(default_factory=list)
    # The shortest GC grace window a queued gc may ask for (and what it gets by default).
    gc_grace_seconds: float = Field(default=DEFAULT_GRACE, ge=0, le=365 * 86400)


class FleetConfig(_Strict):
    """The whole fleet: repository, broker, state directory, domains and schedules."""

    repository: RepositoryConfig
    # More repositories by name (off-site copies, ``vmvault copy --to NAME``); backups
    # are written to ``repository`` only.
    repositories: dict[Name, NamedRepositoryConfig] = Field(default_factory=dict)
    broker: str | None = None
    broker_password_file: AbsolutePath | None = None
    state_dir: Path = Path("/var/lib/vmvault")
    domains: dict[Name, DomainConfig] = Field(default_factory=dict)
    schedules: dict[Name, ScheduleConfig] = Field(default_factory=dict)
    copy_jobs: dict[Name, CopyJobConfig] = Field(default_factory=dict)
    verify_jobs: dict[Name, VerifyJobConfig] = Field(default_factory=dict)
    hosts: dict[Name, HostConfig] = Field(default_factory=dict)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    backup: BackupSettings = Field(default_factory=BackupSettings)
    worker: WorkerPolicy = Field(default_factory=WorkerPolicy)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)

    @field_validator("broker")
    @classmethod
    def _check_broker(cls, url: str | None) -> str | None:
        if url is None:
            return url
        # Masked: a mistyped URL does not make the password any less secret.
        from vmvault.worker.redact import mask_url

        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"bad broker URL {mask_url(url)!r}: use redis://host:port/db")
        if parts.scheme == "rediss":
            # Celery's result backend refuses a TLS URL without it (at the first job).
            reqs = parse_qs(parts.query).get("ssl_cert_reqs", [""])[-1]
            if reqs not in _SSL_CERT_REQS:
                raise ValueError(
                    f"TLS broker URL {mask_url(url)!r} needs ?ssl_cert_reqs=required (and "
                    "&ssl_ca_certs=/path/ca.crt when a private CA signed Redis's certificate)"
                )
        return url

    @field_validator("state_dir")
    @classmethod
    def _absolute_state_dir(cls, path: Path) -> Path:
        if not path.is_absolute():
            raise ValueError(f"state_dir must be an absolute path, got {str(path)!r}")
        return path

    @model_validator(mode="after")
    def _one_place_for_the_password(self) -> FleetConfig:
        if self.broker_password_file is None:
            return self
        if self.broker is None:
            raise ValueError("broker_password_file: needs a broker URL (broker: redis://...)")
        if urlsplit(self.broker).password is not None:
            raise ValueError(
                "broker: the URL carries a password and broker_password_file is set too: "
                "keep the password in the file only"
            )
        return self

    @model_validator(mode="after")
    def _schedules_match_domains(self) -> FleetConfig:
        blocks: list[tuple[str, dict[str, ScheduleConfig] | dict[str, VerifyJobConfig]]] = [
            ("schedules", self.schedules),
            ("verify_jobs", self.verify_jobs),
        ]
        for block, entries in blocks:
            for sched_name, sched in entries.items():
                for pattern in sched.domains:
                    if not fnmatch.filter(self.domains, pattern):
                        raise ValueError(
                            f"{block}.{sched_name}.domains: {pattern!r} matches no configured "
                            "domain"
                        )
        return self

    @model_validator(mode="after")
    def _restore_tests_can_launch(self) -> FleetConfig:
        for name in self.verify_jobs:
            if self.verify_jobs[name].restore_test and not self.restore_test_domains(name):
                raise ValueError(
                    f"verify_jobs.{name}.restore_test: none of its domains has a launch "
                    "description (domains.<name>.launch) to start a restored backup from "
                    "(and, for boot: agent, a guest_agent)"
                )
        return self

    def restore_test_domains(self, job: str) -> list[str]:
        """The domains verify job ``job`` may restore-test: its domains with a launch."""
        entry = self.verify_jobs[job]
        agent = entry.restore_test is not None and entry.restore_test.boot == "agent"
        return [
            d
            for d in self.domains_matching(entry.domains)
            if self.domains[d].launch and (self.domains[d].guest_agent or not agent)
        ]

    @model_validator(mode="after")
    def _hosts_are_used(self) -> FleetConfig:
        used = {d.host for d in self.domains.values()}
        for host in self.hosts:
            if host not in used:
                raise ValueError(f"hosts.{host}: no domain runs on this host (check the name)")
        return self

    @model_validator(mode="after")
    def _repositories_are_distinct(self) -> FleetConfig:
        seen = {self.repository.url: "repository"}
        for name, repo in self.repositories.items():
            repo._where = f"repositories.{name}"
            other = seen.setdefault(repo.url, f"repositories.{name}")
            if other != f"repositories.{name}":
                raise ValueError(
                    f"repositories.{name}: url {repo.url} is the url of {other} too "
                    "(a copy needs two repositories)"
                )
        return self

    @model_validator(mode="after")
    def _copy_jobs_name_repositories(self) -> FleetConfig:
        for job_name, job in self.copy_jobs.items():
            for key, repo in (("to", job.to), ("from", job.source)):
                if repo is not None and repo not in self.repositories:
                    known = ", ".join(sorted(self.repositories)) or "none"
                    raise ValueError(
                        f"copy_jobs.{job_name}.{key}: {repo!r} is not in repositories ({known})"
                    )
            if job.to == job.source:
                raise ValueError(f"copy_jobs.{job_name}: 'from' and 'to' are the same")
            for pattern in job.domains:
                if not fnmatch.filter(self.domains, pattern):
                    raise ValueError(
                        f"copy_jobs.{job_name}.domains: {pattern!r} matches no configured domain"
                    )
        return self

    # Set by ``with_primary``: which ``repositories`` entry ``repository`` now is (the
    # nbdkit plugin, which loads the config file itself, is told the same name).
    _repository_name: str | None = PrivateAttr(default=None)

    @property
    def repository_name(self) -> str | None:
        return self._repository_name

    def with_primary(self, name: str | None) -> FleetConfig:
        """This config acting on ``repositories[name]`` as its repository (restore,
        serve and files read a copy this way); itself for None."""
        if name is None:
            return self
        copy = self.model_copy(update={"repository": self.repository_config(name)})
        copy._repository_name = name
        return copy

    def repository_config(self, name: str | None = None) -> RepositoryConfig:
        """The repository called ``name`` in ``repositories``; None: the primary one.
        ``ConfigError`` naming the known ones for any other name."""
        if name is None:
            return self.repository
        try:
            return self.repositories[name]
        except KeyError:
            known = ", ".join(sorted(self.repositories)) or "none are configured"
            raise ConfigError(
                [f"repository {name!r} is not in the config's repositories ({known})"]
            ) from None

    def broker_url(self) -> str | None:
        """The URL to connect to the broker with: ``broker`` plus the password from
        ``broker_password_file`` (read now; ``ConfigError`` if unreadable or empty).

        It carries the password: hand it to Redis/Celery only, print ``mask_url`` of it.
        """
        if self.broker is None or self.broker_password_file is None:
            return self.broker
        path = self.broker_password_file
        try:
            password = path.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ConfigError([f"broker_password_file: cannot read {path}: {reason}"]) from err
        if not password:
            raise ConfigError([f"broker_password_file: {path} is empty (put the password in it)"])
        parts = urlsplit(self.broker)
        user = parts.netloc.rpartition("@")[0]  # an ACL user name, as written
        hostport = parts.netloc.rpartition("@")[2]
        # Quoted: redis-py and kombu unquote it, and '@', '/' or ':' would split the URL.
        netloc = f"{user}:{quote(password, safe='')}@{hostport}"
        return urlunsplit(parts._replace(netloc=netloc))

    def restore_roots(self) -> list[Path]:
        """Directories queued restores may write under, symlinks resolved (see WorkerPolicy)."""
        roots = self.worker.restore_roots
        if roots is None:
            roots = [self.state_dir / "images"]
            for domain in self.domains.values():
                if domain.launch is not None and domain.launch.image_dir is not None:
                    roots.append(domain.launch.image_dir)
        resolved: list[Path] = []
        for root in roots:
            path = Path(os.path.realpath(root))
            if path not in resolved:
                resolved.append(path)
        return resolved

    def host(self, name: str) -> HostConfig:
        """Settings of host ``name`` (defaults when the config does not list it)."""
        return self.hosts.get(name) or HostConfig()

    def domain(self, name: str) -> DomainConfig:
        """The config of domain ``name``; ``UnknownDomainError`` names the known ones."""
        try:
            return self.domains[name]
        except KeyError:
            known = ", ".join(sorted(self.domains)) or "none"
            raise UnknownDomainError(
                f"unknown domain {name!r}: not in the config's domains (known: {known})"
            ) from None

    def incoming_image_dir(self, name: str) -> Path:
        """Where ``restore --incoming`` writes domain ``name``'s images when not told:
        ``launch.image_dir``, else ``<state_dir>/images/<name>``."""
        launch = self.domain(name).launch
        if launch is not None and launch.image_dir is not None:
            return launch.image_dir
        return self.state_dir / "images" / name

    def domains_matching(self, patterns: list[str]) -> list[str]:
        """Configured domain names matching any of ``patterns`` (names or globs), sorted."""
        return sorted(d for d in self.domains if any(fnmatch.fnmatch(d, p) for p in patterns))


class UnknownDomainError(Exception):
    """A command named a domain that the config does not list. Not retryable."""


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _DuplicateKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first defined on line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node)


_DuplicateKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


def config_path(explicit: str | Path | None) -> Path:
    """The config file to use: explicit, else ``$VMVAULT_CONFIG``, else ``./vmvault.yaml``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else Path(DEFAULT_CONFIG_NAME)


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if item == "[key]":
            # pydantic marks a bad mapping *key* this way: the name itself is wrong.
            parts.append(" (the name)")
        elif isinstance(item, int):
            parts.append(f"[{item}]")
        elif parts:
            parts.append(f".{item}")
        else:
            parts.append(item)
    return "".join(parts) or "(top level)"


def _describe(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind == "string_pattern_mismatch" and error["ctx"].get("pattern") == NAME_PATTERN:
        return (
            f"bad name {error['input']!r}: use up to 63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if kind == "greater_than_equal":
        return f"must be at least {error['ctx']['ge']}, got {error['input']!r}"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def parse_config(data: Any, source: str) -> FleetConfig:
    """Validate already-loaded YAML data; ``ConfigError`` lists every problem."""
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the file must hold a mapping with a 'repository' key"])
    try:
        return FleetConfig.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            loc = tuple(error["loc"])
            problems.append(f"{source}: {_key_path(loc)}: {_describe(error)}")
        raise ConfigError(problems) from err


def load_config(path: str | Path | None = None) -> FleetConfig:
    """Read and validate the fleet config file; ``ConfigError`` lists every problem."""
    file = config_path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise ConfigError(
            [f"{file}: config file not found (pass --config FILE or set ${CONFIG_ENV})"]
        ) from None
    except OSError as err:
        raise ConfigError([f"{file}: cannot read config file: {err.strerror}"]) from err
    try:
        data = yaml.load(text, Loader=_DuplicateKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"{file}: {where}{problem}"]) from err
    return parse_config(data, str(file))


def is_valid_name(name: str) -> bool:
    """True when ``name`` is safe as a domain/disk/host name (see ``NAME_PATTERN``)."""
    # fullmatch: "$" alone also matches before a trailing newline ("vm\n").
    return bool(_NAME_RE.fullmatch(name))
