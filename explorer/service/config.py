"""What ``explorer serve`` was started with (:class:`ServiceConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from explorer.service.fetch import FetchRules
from explorer.service.policy import Quotas
from explorer.service.uploads import Limits


@dataclass
class ServiceConfig:
    """What ``explorer serve`` was started with."""

    root: Path
    data: Path
    concurrency: int = 1
    allow_private_urls: bool = False
    limits: Limits = field(default_factory=Limits)
    quotas: Quotas = field(default_factory=Quotas)
    fetch: FetchRules | None = None
    app_idle: float = 1800.0
    url_timeout: float = 10.0
    app_max_running: int = 8  # app processes at once
    app_max_per_user: int = 3  # app processes one user's requests may start
    app_recheck: float = 2.0  # seconds between access checks of an open app websocket
    #: the ``Host`` values requests may carry besides loopback names on the served port (DNS
    #: rebinding, review N2): ``host[:port]`` patterns as ``--allowed-host`` takes them. None:
    #: not checked (an app embedded in a test client or another ASGI server); ``explorer
    #: serve`` always checks
    allowed_hosts: tuple[str, ...] | None = None

    def __post_init__(self):
        from explorer.paths import check_image_root

        self.root = check_image_root(Path(self.root).expanduser())  # UnsafePath: a ValueError
        self.data = Path(self.data).expanduser().resolve()
        self.data.mkdir(parents=True, exist_ok=True)
        if not self.app_recheck > 0:
            raise ValueError(f"app_recheck must be > 0 seconds, got {self.app_recheck!r}")
        if self.fetch is None:
            if not self.url_timeout > 0:
                raise ValueError(f"url_timeout must be > 0 seconds, got {self.url_timeout!r}")
            self.fetch = FetchRules(allow_private=self.allow_private_urls,
                                    max_bytes=self.limits.max_file_bytes,
                                    timeout=self.url_timeout,
                                    deadline=max(60.0, 3 * self.url_timeout))
