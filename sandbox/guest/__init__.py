"""Guest layer: SSH channel, command results, guest agent, key, the guest-side files.
Imports sandbox.base and sandbox.errors only (not sandbox.host, its peer).
"""
