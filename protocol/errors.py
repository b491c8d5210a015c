"""Every protocol violation is fatal to the connection; there is one exception type."""


class ProtocolError(Exception):
    """The peer broke the protocol. The connection must be closed; nothing is retried."""
