"""The root privilege helper.

Synchronous, stdlib plus ctypes bindings to libc and libpam, run as `python3 -I`. It
accepts authenticated requests from exactly one broker, checks them against a root-owned
policy, and starts user endpoint processes through per-UEP session processes. Anything
unexpected ends the connection; read monitor.py first.
"""
