"""The guest's CPU model and the host's CPU: which model names this QEMU knows, and an
identity of the host processor for the keys of machine states saved with ``-cpu host``.

A state saved under KVM with a host-dependent model (``host``, ``max``) loads only on the
same processor, so its key carries :func:`host_cpu_identity`; a named model (``Haswell``,
``x86-64-v3``) is the same on every host that can run it, so its states move between hosts.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import re
import subprocess
from pathlib import Path

from ..errors import HostError

#: A QEMU CPU model name: no commas or '=', so a setting cannot smuggle in -cpu properties.
CPU_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Models whose CPUID under KVM is the host processor's.
HOST_DEPENDENT = ("host", "max")

#: The CPU model under TCG when none is asked for: QEMU's "max" without ERMS. With ERMS the
#: guest's kernel and C library copy memory with ``rep movsb``, which TCG runs one byte per
#: iteration; without it they copy in words and vectors: cat of a cached file 2.2x faster,
#: a pipe 1.3x, payload hashing 1.2x (measured here). The flags that build on ERMS go with it
#: where this QEMU knows them (a real processor never has them without ERMS, and Linux 6.1
#: hangs early in boot on QEMU 10's max without ERMS but with FSRM). KVM keeps the host's own
#: model. See :func:`tcg_cpu`.
TCG_CPU_REMOVED = ("erms", "fsrm", "fzrm", "fsrs", "fsrc")
#: The x86-64 ABI levels, which older QEMU (7.2 among them) does not know as models: the
#: named model that has each level's features (v2: SSE4.2, POPCNT; v3: AVX2, BMI2, FMA,
#: MOVBE; v4: AVX-512).
ABI_LEVEL_MODELS = {
    "x86-64-v1": "qemu64",
    "x86-64-v2": "Nehalem",
    "x86-64-v3": "Haswell-noTSX",
    "x86-64-v4": "Skylake-Server-noTSX-IBRS",
}


def cpu_model_problem(name: object) -> str | None:
    """Why ``name`` is not a CPU model name, or None when it looks like one."""
    if not isinstance(name, str) or not CPU_MODEL.fullmatch(name):
        return (f"CPU model {name!r} is not a model name: use letters, digits, '.', '_' or "
                "'-', such as x86-64-v3, Haswell, host or max (qemu-system-x86_64 -cpu help "
                "lists them)")
    return None


@functools.cache
def _cpu_help(binary: str) -> str:
    try:
        result = subprocess.run([binary, "-cpu", "help"], capture_output=True, text=True,
                                timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout


def qemu_cpu_models(binary: str) -> tuple[str, ...]:
    """The CPU model names ``binary`` knows (``-cpu help``), or () when it cannot say."""
    models = []
    for line in _cpu_help(binary).splitlines():
        if not line.strip():
            break  # the model list ends where "Recognized CPUID flags" begins
        match = re.match(r"\s*x86\s+(\S+)", line)
        if match:
            models.append(match.group(1))
    return tuple(models)


def qemu_cpu_flags(binary: str) -> frozenset[str]:
    """The CPUID flag names ``binary`` knows (``-cpu help``), or none when it cannot say."""
    _, found, flags = _cpu_help(binary).partition("Recognized CPUID flags:")
    return frozenset(flags.split()) if found else frozenset()


def tcg_cpu(binary: str) -> str:
    """The -cpu argument under TCG when none is asked for: ``max`` without
    :data:`TCG_CPU_REMOVED` (those of them ``binary`` knows); plain ``max`` when it cannot
    say which flags it knows (a flag it does not know would stop it from starting)."""
    known = qemu_cpu_flags(binary)
    removed = [f"-{flag}" for flag in TCG_CPU_REMOVED if flag in known]
    return ",".join(["max", *removed]) if "erms" in known else "max"


def qemu_cpu_model(name: str, binary: str) -> str:
    """The model to pass to ``binary -cpu`` for the setting ``name``: ``name`` itself, or for
    an ABI level this QEMU does not know (x86-64-v3 on QEMU 7.2) the named model that has its
    features. HostError, listing some models that work, when ``binary`` knows neither."""
    known = qemu_cpu_models(binary)
    if not known or name in known:
        return name
    if name in ABI_LEVEL_MODELS and ABI_LEVEL_MODELS[name] in known:
        return ABI_LEVEL_MODELS[name]
    lowered = {model.lower(): model for model in known}
    hint = f" (did you mean {lowered[name.lower()]!r}?)" if name.lower() in lowered else ""
    named = [m for m in known if not re.search(r"-v\d+$|-IBRS|-IBPB|-noTSX|^(base|host|max)$", m)]
    some = ", ".join(["host", "max", *sorted(ABI_LEVEL_MODELS), *named[:12]])
    raise HostError(f"CPU model {name!r} is unknown to {binary}{hint}; models it knows include "
                    f"{some} (all: {binary} -cpu help)")


def host_cpu_identity(cpuinfo: str | None = None) -> str:
    """The host processor as a key part: vendor, family, model, stepping and a hash of its
    feature flags (from ``/proc/cpuinfo``, or ``cpuinfo``)."""
    if cpuinfo is None:
        return _this_host_cpu()
    first = cpuinfo.strip().split("\n\n")[0]
    fields: dict[str, str] = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    flags = " ".join(sorted((fields.get("flags") or fields.get("Features") or "").split()))
    if "vendor_id" not in fields:  # not x86: the whole description of the first processor
        return f"{platform.machine()}:{hashlib.sha256(first.encode()).hexdigest()[:16]}"
    return ":".join([fields["vendor_id"], fields.get("cpu family", "?"),
                     fields.get("model", "?"), fields.get("stepping", "?"),
                     hashlib.sha256(flags.encode()).hexdigest()[:16]])


@functools.cache
def _this_host_cpu() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = f"unknown: {platform.machine()} {platform.processor()}"
    return host_cpu_identity(cpuinfo)


def host_cpu_name() -> str:
    """The host processor's marketing name (``model name``), for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
