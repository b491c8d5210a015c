"""The helper protocol: framing, strict canonical JSON, typed messages, and an I/O-free
session machine that both sides drive. Stdlib only; nothing here touches a socket."""
