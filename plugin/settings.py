"""The plugin's settings, kept in QgsSettings under "skyprompt/"."""
from __future__ import annotations

from dataclasses import dataclass, fields

from qgis.core import QgsSettings

from .connection import GRPC_SCHEME, URL_SCHEME, address_example, port_problem

PREFIX = "skyprompt/"
LOG_TAG = "SkyPrompt"


class SettingError(ValueError):
    """A setting that cannot be used as it is; the message names it and says how to fix it."""


class AddressError(SettingError):
    """The backend address is not HOST:PORT; the message says how to write it."""


def address_problem(address: str) -> str | None:
    """Why `address` is not HOST:PORT with a scheme or a path (a URL, where gRPC wants
    "127.0.0.1:50051") or a port outside 1..65535, else None. Nothing is stripped from it: the user's field
    stays as typed."""
    address = address.strip()
    if GRPC_SCHEME.match(address):      # a gRPC target name ("dns:///host:50051", "unix:///run/sp.sock") is fine
        return port_problem(address)
    scheme = URL_SCHEME.match(address)
    rest = address[scheme.end():] if scheme else address
    if not scheme and "/" not in rest:
        return port_problem(address)
    what = " and ".join(w for w, there in (("a scheme", bool(scheme)), ("a path", "/" in rest)) if there)
    example = address_example(rest.split("/", 1)[0])
    return (f"the address {address!r} has {what}: give it as HOST:PORT, without a scheme (http://) or a path "
            f"(/...), e.g. {example}, in the SkyPrompt address field")


@dataclass
class PluginSettings:
    address: str = "127.0.0.1:50051"  # host:port of the backend
    token: str = ""                   # bearer token ("" = none)
    use_tls: bool = False
    tls_ca: str = ""                  # PEM file of the CA ("" = system roots) when use_tls
    python: str = "python3"           # interpreter that runs `python -m backend serve`
    backend_dir: str = ""             # working folder of that command (where `backend` imports)
    checkpoint: str = ""              # "" = the backend's bundled checkpoint
    device: str = "auto"
    k: int = 20
    threshold: float = 0.5
    min_area_m2: float = 0.0
    # the panel's switches, as the user left them
    rotation_views: bool = False
    expand_query: bool = False
    match_captions: bool = True
    search_in_view: bool = False
    follow_edges: bool = True
    max_pixel_side: int = 2048        # cap for layers sent as pixels (XYZ, WMS, in-memory)
    start_timeout_s: float = 180.0    # how long a local backend may take to load its model

    # what the panel's and the settings dialog's fields allow: a stored value outside (a hand-edited
    # QGIS3.ini, a setting from another version) is read as the default, not passed on to a widget
    # that cannot hold it, or to the backend (a 0 px side, a k past 2^31)
    RANGES = {"k": (1, 1000), "threshold": (0.0, 1.0), "min_area_m2": (0.0, 1e9),
              "max_pixel_side": (256, 16384), "start_timeout_s": (10.0, 3600.0)}

    @classmethod
    def load(cls) -> "PluginSettings":
        s, out = QgsSettings(), cls()
        for f in fields(cls):
            default = getattr(out, f.name)
            value = s.value(PREFIX + f.name, default)
            try:
                if isinstance(default, bool):
                    value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
                else:
                    value = type(default)(value)
            except (TypeError, ValueError, OverflowError):
                value = default
            low, high = cls.RANGES.get(f.name, (None, None))
            if low is not None and not low <= value <= high:     # NaN too
                value = default
            setattr(out, f.name, value)
        return out

    def save(self) -> None:
        s = QgsSettings()
        for f in fields(self):
            s.setValue(PREFIX + f.name, getattr(self, f.name))

    @property
    def host(self) -> str:
        """The address's host ("" when it has none), without an IPv6 address's brackets."""
        return self.address.strip().rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The address's port; AddressError when it has none (a backend started on a default port
        would not be the one the plugin asks), or is a URL (a scheme, a path) rather than HOST:PORT."""
        problem = address_problem(self.address)
        if problem:
            raise AddressError(problem)
        _, _, port = self.address.strip().rpartition(":")
        if not port.isdigit():      # (a port out of range is address_problem's)
            raise AddressError(f"the address {self.address!r} has no port: give the address as HOST:PORT, "
                               "e.g. 127.0.0.1:50051, in the SkyPrompt address field")
        return int(port)

    def connection(self):
        """A BackendConnection with these settings (imports grpc: call only once dependencies are in)."""
        from .connection import BackendConnection

        return BackendConnection(self.address, token=self.token or None,
                                 tls_ca=(self.tls_ca if self.use_tls else None))
