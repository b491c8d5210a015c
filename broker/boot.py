"""`mepctl enable-on-boot NAME [--socket-activated]`: systemd units for one MEP.

The unit texts are the templates in the project's systemd/ directory (installed with the
package under share/mep/systemd). Two ways to run a MEP:

  launch (default)     globus-compute-mep-NAME.service: `mepctl start NAME` as root; that
                       process becomes the helper and starts the broker unprivileged.
  --socket-activated   globus-compute-mep-NAME.service runs the broker as its own account
                       in a tight sandbox; it connects to globus-compute-mep-NAME-helper.socket,
                       which starts one root helper (…-helper@.service) per connection.

systemd names the service of an Accept=yes socket after the socket's prefix alone, so a
template socket could not tell its helper which MEP it serves; each MEP therefore gets
its own rendered pair, with its policy path written into the helper's ExecStart.
"""

from __future__ import annotations

import grp
import pathlib
import pwd
import sys
import tomllib

import yaml

from broker import layout

UNIT_DIR = pathlib.Path("/etc/systemd/system")
# what the helper needs: become the user, signal its UEPs, drop the bounding set, and what
# common PAM session modules need (audit, loginuid, limits, mkhomedir); SECURITY.md lists why
HELPER_CAPS = ("CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_KILL CAP_AUDIT_WRITE CAP_AUDIT_CONTROL CAP_SYS_RESOURCE "
               "CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH")
HOME_TREES = ("/home", "/root", "/run/user")


class BootError(Exception):
    pass


def template_dir() -> pathlib.Path:
    """A checkout's systemd/ beside this package, else the installed copy."""
    checkout = pathlib.Path(__file__).resolve().parent.parent / "systemd"
    return checkout if (checkout / "launch.service.in").exists() else pathlib.Path(sys.prefix, "share", "mep", "systemd")


def service_name(name: str) -> str:
    return f"globus-compute-mep-{name}"


def unit_files(name: str, socket_activated: bool) -> dict[str, str]:
    """Installed unit file name -> template file name."""
    base = service_name(name)
    if not socket_activated:
        return {f"{base}.service": "launch.service.in"}
    return {f"{base}.service": "broker.service.in", f"{base}-helper.socket": "helper.socket.in",
            f"{base}-helper@.service": "helper@.service.in"}


def socket_path(name: str) -> str:
    return f"/run/{service_name(name)}/helper.sock"


def render(name: str, root: pathlib.Path, *, socket_activated=False, stop_timeout=60,
           python: str = sys.executable) -> dict[str, str]:
    """Every unit for MEP `name` under config root `root`: file name -> text."""
    root = root.expanduser().resolve()
    conf_dir = root / name
    values = {"name": name, "root": root, "conf_dir": conf_dir, "python": python, "stop_timeout": stop_timeout,
              "helper_caps": HELPER_CAPS, "socket_path": socket_path(name)}
    if socket_activated:
        values.update(_broker_values(conf_dir))
    return {unit: (template_dir() / template).read_text().format(**values)
            for unit, template in unit_files(name, socket_activated).items()}


def _broker_values(conf_dir: pathlib.Path) -> dict:
    """The broker account (from the helper policy) and the paths it may write."""
    try:
        with open(layout.policy_file(conf_dir), "rb") as f:
            user = tomllib.load(f)["broker_user"]
        account = pwd.getpwnam(user)
        config = yaml.safe_load(layout.config_file(conf_dir).read_text()) or {}
    except (OSError, KeyError, tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise BootError(f"cannot read the broker account and paths from {conf_dir}: ({type(e).__name__}) {e}") from None
    writable = [str(layout.log_file(conf_dir)), str(layout.run_dir(conf_dir))]
    if isinstance(config, dict) and config.get("audit_log_path"):  # resolved as broker/config.py resolves it
        writable.append(f"-{layout.resolve(conf_dir, str(config['audit_log_path']))}")  # "-": a missing file is the broker's error to report
    in_home = any(str(p).startswith(HOME_TREES) for p in (conf_dir, *writable))
    return {"broker_user": user, "broker_group": grp.getgrgid(account.pw_gid).gr_name, "writable": " ".join(writable),
            # a config under a home directory must stay visible; read-only still lets ReadWritePaths through
            "protect_home": "read-only" if in_home else "yes"}


def enable(name: str, root: pathlib.Path, unit_dir: pathlib.Path = UNIT_DIR, stop_timeout: int = 60,
           socket_activated: bool = False) -> str:
    if not unit_dir.is_dir():
        raise BootError(f"{unit_dir} does not exist: systemd is not this machine's init system. Start the MEP "
                        f"with `mepctl start {name}` from your init system instead.")
    units = render(name, root, socket_activated=socket_activated, stop_timeout=stop_timeout)
    existing = [str(unit_dir / u) for u in unit_files(name, True) if (unit_dir / u).exists()]
    if existing:
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise BootError(f"{', '.join(existing)} {verb}; `mepctl disable-on-boot {name}` says how to remove it")
    written = []
    try:
        for unit, text in units.items():
            with open(unit_dir / unit, "x") as f:
                f.write(text)
            (unit_dir / unit).chmod(0o644)
            written.append(unit_dir / unit)
    except PermissionError as e:
        for path in written:
            path.unlink()
        shown = "\n".join(f"----- {u} -----\n{t}" for u, t in units.items())
        raise BootError(f"{e}: run as root.\n{shown}") from None
    enable_what = f"{service_name(name)}-helper.socket {service_name(name)}" if socket_activated else service_name(name)
    return (f"Systemd units installed: {', '.join(map(str, written))}. Run\n\tsystemctl daemon-reload\n"
            f"\tsystemctl enable {enable_what} --now\nto enable them and start the endpoint.")


def disable(name: str, unit_dir: pathlib.Path = UNIT_DIR) -> str:
    paths = [unit_dir / u for u in unit_files(name, True) if (unit_dir / u).exists()]
    if not paths:
        raise BootError(f"there is no systemd unit for endpoint {name} ({unit_dir / (service_name(name) + '.service')} "
                        "not found)")
    units = " ".join(p.name for p in paths if not p.name.endswith("@.service"))
    return (f"Run the following to disable on-boot persistence:\n\tsystemctl stop {units}\n"
            f"\tsystemctl disable {units}\n\trm {' '.join(map(str, paths))}\n\tsystemctl daemon-reload")
