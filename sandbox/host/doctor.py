"""``sandbox doctor``'s report: QEMU and tools, image builds, cache space, firmware, KVM access,
and the accelerator verdict, which the caller hands in (it boots a probe kernel: see
:mod:`sandbox.vm.accel`), each problem with its fix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any, Protocol

from ..base.paths import account_name, cache_dir, find_tool, runtime_dir
from ..base.sizes import format_size
from ..errors import HostError
from .access import BOOT_DISK_TOOLS, TOOL_PACKAGES, kvm_access_problem, unprivileged_build_problems
from .cpu import HOST_DEPENDENT, host_cpu_identity, host_cpu_name, tcg_cpu
from .firmware import ovmf_firmware
from .tools import tool_version


class Verdict(Protocol):
    """What the report needs of an accelerator verdict (:class:`sandbox.vm.accel.AccelVerdict`)."""

    @property
    def kvm_usable(self) -> bool: ...

    @property
    def tcg_usable(self) -> bool: ...

    @property
    def reason(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...


def doctor_report(accel_verdict: Callable[[], Verdict]) -> dict[str, Any]:
    """Everything ``sandbox doctor`` prints; ``ok`` is False when guests cannot run at all.
    ``accel_verdict`` is asked only when QEMU, the cache and the runtime directory are there.

    Each problem names its fix. Problems that only cost speed (no KVM access) or only stop
    image builds are listed without making ``ok`` false.
    """
    report: dict[str, Any] = {"ok": True, "problems": [], "tools": {},
                              "user": account_name(os.getuid()), "uid": os.getuid()}
    unprivileged = os.geteuid() != 0
    builders = (("genext2fs", "tune2fs", "e2fsck", "newuidmap", "newgidmap") if unprivileged
                else ("mke2fs",))
    for name, needed in (("qemu-system-x86_64", True), ("qemu-img", True),
                         ("mmdebstrap", False), *((tool, False) for tool in builders)):
        binary = (os.environ.get("SANDBOX_QEMU") if name == "qemu-system-x86_64" else None)
        path = find_tool(binary or name)
        package = TOOL_PACKAGES[name]
        entry: dict[str, Any] = {"path": path, "package": package,
                                 "version": tool_version(path) if path else None,
                                 "needed_for": "running guests" if needed else "building images"}
        report["tools"][name] = entry
        if not path:
            report["problems"].append(f"{name} is missing ({entry['needed_for']}): "
                                      f"sudo apt-get install {package}")
            if needed:
                report["ok"] = False

    report["builds"] = {"mode": "unshare" if unprivileged else "root", "problems": []}
    if unprivileged:
        problems = [p for p in unprivileged_build_problems() if "is missing" not in p]
        report["builds"]["problems"] = problems
        report["problems"] += [f"image builds as {report['user']}: {p}" for p in problems]
    report["builds"]["ready"] = not report["builds"]["problems"] and all(
        tool["path"] for tool in report["tools"].values())

    for what, where in (("cache", cache_dir), ("runtime_dir", runtime_dir)):
        try:
            report[what] = {"path": str(where())}
        except HostError as exc:
            report[what] = {"path": None, "problem": str(exc)}
            report["problems"].append(str(exc))
            report["ok"] = False
    if report["cache"]["path"]:
        usage = shutil.disk_usage(report["cache"]["path"])
        report["cache"].update(free_bytes=usage.free, free=format_size(usage.free))
        if usage.free < (3 << 30):
            report["problems"].append(f"only {format_size(usage.free)} free in the cache "
                                      f"{report['cache']['path']}: an image build needs about "
                                      "3G (set SANDBOX_CACHE_DIR)")

    # Optional: only imported images with boot = "uefi" need it.
    try:
        report["uefi"] = {"firmware": str(ovmf_firmware()), "problem": None}
    except HostError as exc:
        report["uefi"] = {"firmware": None, "problem": str(exc)}

    # Optional: without them clones keep a copy of the kernel (sandbox.vm.bootdisk).
    missing = sorted({TOOL_PACKAGES[name] for name in BOOT_DISK_TOOLS
                      if find_tool(name) is None})
    report["boot_disk"] = {"ready": not missing, "missing_packages": missing}

    # Shown on a line of its own (guests still run, under TCG), not among the problems.
    report["kvm_access"] = {"device": os.path.exists("/dev/kvm"),
                            "problem": kvm_access_problem() if os.path.exists("/dev/kvm")
                            else None}
    if report["tools"]["qemu-system-x86_64"]["path"] and report["cache"]["path"] \
            and report["runtime_dir"]["path"]:
        verdict = accel_verdict()
        report["accel"] = verdict.to_json()
        if not (verdict.kvm_usable or verdict.tcg_usable):
            report["ok"] = False
            report["problems"].append(f"guests cannot boot: {verdict.reason}")
    else:
        report["accel"] = None
    # The model clones get when no cpu= is set; its states carry the host's identity in
    # their keys only when that model is the host's CPU (KVM).
    accel = report["accel"] or {}
    qemu = report["tools"]["qemu-system-x86_64"]["path"]
    model = ((accel.get("kvm_cpu") or "host") if accel.get("accel") == "kvm"
             else tcg_cpu(qemu) if qemu else "max")
    report["cpu"] = {"host": host_cpu_name(), "identity": host_cpu_identity(),
                     "default_model": model,
                     "keys_name_host": accel.get("accel") == "kvm" and model in HOST_DEPENDENT}
    return report
