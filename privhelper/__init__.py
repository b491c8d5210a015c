"""The root privilege helper (stdlib + ctypes, run as `python3 -I -S`); docs/root-code.md maps it."""
