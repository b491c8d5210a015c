"""`mepctl enable-on-boot NAME`: one systemd unit for the socketpair launch.

systemd starts `mepctl start NAME` as root; that process becomes the helper, which starts
the broker as the broker account. Stopping sends TERM to the helper alone (KillMode=mixed),
which stops the broker, then each UEP and its PAM session, in order; whatever is left
after TimeoutStopSec is killed. A reload goes through the admin socket, so the broker
re-executes in place and the user endpoints keep running. The socket-activated pair of
units (systemd/) is the alternative for sites that keep the helper apart.
"""

from __future__ import annotations

import pathlib
import sys

UNIT_DIR = pathlib.Path("/etc/systemd/system")

UNIT = """\
# Installed by `mepctl enable-on-boot {name}`. Remove with `mepctl disable-on-boot {name}`.
[Unit]
Description=Globus Compute multi-user endpoint "{name}" (privilege-separated)
Documentation=file://{conf_dir}/config.yaml
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=0

[Service]
Type=simple
# root: this process becomes the helper; the broker runs as the account in
# {conf_dir}/helper-policy.toml and never holds root.
ExecStart={python} -I -m broker.mepctl start {name} --config-root {root}
ExecReload={python} -I -m broker.mepctl reload {name} --config-root {root}
KillMode=mixed
TimeoutStopSec={stop_timeout}
Restart=always
RestartSec=1
UMask=0077
PrivateTmp=yes
ProtectClock=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectHostname=yes
RestrictRealtime=yes
RestrictNamespaces=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK

[Install]
WantedBy=multi-user.target
"""


class BootError(Exception):
    pass


def service_name(name: str) -> str:
    return f"globus-compute-mep-{name}"


def unit_text(name: str, root: pathlib.Path, stop_timeout: int) -> str:
    root = root.expanduser().resolve()
    return UNIT.format(name=name, root=root, conf_dir=root / name, python=sys.executable, stop_timeout=stop_timeout)


def enable(name: str, root: pathlib.Path, unit_dir: pathlib.Path = UNIT_DIR, stop_timeout: int = 60) -> str:
    if not unit_dir.is_dir():
        raise BootError(f"{unit_dir} does not exist: systemd is not this machine's init system. Start the MEP "
                        f"with `mepctl start {name}` from your init system instead.")
    path = unit_dir / f"{service_name(name)}.service"
    text = unit_text(name, root, stop_timeout)
    try:
        with open(path, "x") as f:
            f.write(text)
    except FileExistsError:
        raise BootError(f"{path} already exists; `mepctl disable-on-boot {name}` removes it") from None
    except PermissionError as e:
        raise BootError(f"{e}: run as root.\n----- unit file -----\n{text}") from None
    path.chmod(0o644)
    return (f"Systemd service installed at {path}. Run\n\tsystemctl daemon-reload\n"
            f"\tsystemctl enable {service_name(name)} --now\nto enable the service and start the endpoint.")


def disable(name: str, unit_dir: pathlib.Path = UNIT_DIR) -> str:
    path = unit_dir / f"{service_name(name)}.service"
    if not path.exists():
        raise BootError(f"there is no systemd unit for endpoint {name} ({path} not found)")
    return (f"Run the following to disable on-boot persistence:\n\tsystemctl stop {service_name(name)}\n"
            f"\tsystemctl disable {service_name(name)}\n\trm {path}\n\tsystemctl daemon-reload")
