"""Host layer: what this host offers (QEMU and its tools, KVM access, firmware, doctor).
Imports sandbox.base and sandbox.errors only.
"""
