"""What this host can do: QEMU and tools, cache space, and whether KVM really works.

KVM counts as usable only when a stock Linux kernel gets past early start under it: on
paravirtualised nested hosts ``/dev/kvm`` opens and ``KVM_CREATE_VM`` succeeds, yet a guest
kernel hangs without printing a byte. The probe boots a real kernel under KVM (and, as a
control, under TCG) and watches the serial port for its banner. The verdict is cached per
host kernel release and QEMU version, so asking again is instant.
"""

from __future__ import annotations

import functools
import grp
import hashlib
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock

from .errors import HostError
from .paths import account_name, cache_dir, find_tool, runtime_dir
from .sizes import format_size

#: How long a kernel may take to print its banner under KVM before KVM counts as unusable.
KVM_PROBE_SECONDS = 3.0
#: The same under TCG (the control run that proves the probe kernel itself is sound).
TCG_PROBE_SECONDS = 8.0
#: The probe's kernel package, fetched from the host's apt sources when no image has one.
PROBE_KERNEL_PACKAGE = "linux-image-cloud-amd64"
_BANNER = b"Linux version"
_INSTALL_HINT = "apt-get install qemu-system-x86 qemu-utils"

#: Host programs and the Debian package of each.
TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs", "tune2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs", "genext2fs": "genext2fs", "newuidmap": "uidmap",
    "newgidmap": "uidmap", "unshare": "util-linux",
}
#: Subordinate ids an unprivileged build needs: every uid and gid a Debian package may use.
SUBORDINATE_IDS = 65536


def qemu_binary() -> str:
    """The QEMU system emulator (``SANDBOX_QEMU`` overrides), or HostError naming the package."""
    override = os.environ.get("SANDBOX_QEMU")
    found = find_tool(override or "qemu-system-x86_64")
    if not found:
        raise HostError(f"QEMU not found ({override or 'qemu-system-x86_64'} is not on PATH); "
                        f"install it with: {_INSTALL_HINT}")
    return found


@functools.cache
def tool_version(binary: str) -> str:
    for flag in ("--version", "-V"):  # e2fsprogs answers -V only, on stderr
        try:
            result = subprocess.run([binary, flag], capture_output=True, text=True,
                                    timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        match = re.search(r"(\d+\.\d+(?:\.\d+)?)", result.stdout + result.stderr)
        if match:
            return match.group(1)
    return "present"


def qemu_version() -> str:
    return tool_version(qemu_binary())


@dataclass(frozen=True)
class AccelVerdict:
    """Which accelerator guests use here, and why."""

    accel: str                  # "kvm" or "tcg"
    kvm_usable: bool
    kvm_cpu: str                # CPU model that works under KVM ("host" or "qemu64")
    tcg_usable: bool
    reason: str
    host_kernel: str
    qemu_version: str
    probed_at: str
    probe_seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def accel_verdict(*, refresh: bool = False) -> AccelVerdict:
    """The cached verdict for this host, probing once when there is none."""
    # Per account and per access: being added to the kvm group changes the verdict.
    key = {"host_kernel": platform.release(), "qemu_version": qemu_version(),
           "kvm_device": os.path.exists("/dev/kvm"), "uid": os.getuid(),
           "kvm_access": os.access("/dev/kvm", os.R_OK | os.W_OK)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_dir() / "host"
    directory.mkdir(exist_ok=True)
    path = directory / f"accel-{digest}.json"
    with filelock.FileLock(str(directory / "accel.lock"), timeout=120):
        if path.exists() and not refresh:
            return AccelVerdict(**json.loads(path.read_text()))
        verdict = _probe()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(verdict.to_json(), indent=2))
        tmp.rename(path)
        return verdict


def resolve_accel(requested: str) -> str:
    """``auto``/``kvm``/``tcg`` to the accelerator to use, or HostError when it cannot work."""
    if requested not in ("auto", "kvm", "tcg"):
        raise HostError(f"unknown accelerator {requested!r}: use auto, kvm or tcg")
    if requested == "tcg":
        return "tcg"
    verdict = accel_verdict()
    if requested == "kvm" and not verdict.kvm_usable:
        raise HostError(f"KVM was requested but does not work on this host: {verdict.reason}. "
                        "Use accel='tcg' (or 'auto'); run 'sandbox doctor --refresh' after "
                        "fixing the host.")
    if not verdict.kvm_usable and not verdict.tcg_usable:
        raise HostError(f"guests cannot boot on this host: {verdict.reason}")
    return verdict.accel


def _probe() -> AccelVerdict:
    started = time.monotonic()
    qemu = qemu_binary()
    common = dict(host_kernel=platform.release(), qemu_version=qemu_version(),
                  probed_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    kvm_problem = _kvm_device_problem()
    try:
        kernel = probe_kernel()
    except HostError as exc:
        return AccelVerdict(accel="tcg", kvm_usable=False, kvm_cpu="", tcg_usable=True,
                            reason=f"could not probe KVM: {exc}",
                            probe_seconds=round(time.monotonic() - started, 2), **common)
    with ThreadPoolExecutor(2) as pool:
        tcg_run = pool.submit(_boot_banner, qemu, kernel, "tcg", "max", TCG_PROBE_SECONDS)
        kvm_run = pool.submit(_probe_kvm, qemu, kernel) if kvm_problem is None else None
        tcg_seconds, tcg_error = tcg_run.result()
        kvm_seconds, kvm_cpu, kvm_error = (kvm_run.result() if kvm_run
                                           else (None, "", kvm_problem))
    tcg_ok = tcg_seconds is not None
    tcg_note = (f"under TCG the same kernel printed its banner in {tcg_seconds:.1f} s"
                if tcg_ok else f"under TCG it did not boot either ({tcg_error})")
    if kvm_seconds is not None:
        accel, reason = "kvm", (f"a stock kernel printed its banner {kvm_seconds:.2f} s after "
                                "start under KVM")
    elif kvm_problem is not None:
        accel, reason = "tcg", kvm_problem
    else:
        accel = "tcg"
        reason = f"/dev/kvm opens, but under KVM {kvm_error}; {tcg_note}{_nested_hint()}"
    return AccelVerdict(accel=accel, kvm_usable=kvm_seconds is not None, kvm_cpu=kvm_cpu,
                        tcg_usable=tcg_ok,
                        reason=reason if tcg_ok or accel == "kvm" else f"{reason}; {tcg_note}",
                        probe_seconds=round(time.monotonic() - started, 2), **common)


def _kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host (enable virtualisation, or load kvm_intel/kvm_amd)"
    return kvm_access_problem()


def kvm_access_problem(device: str = "/dev/kvm") -> str | None:
    """Why this account cannot open ``device`` read-write, with the fix; None if it can."""
    if os.access(device, os.R_OK | os.W_OK):
        return None
    info = os.stat(device)
    me = account_name(os.getuid())
    try:
        entry = grp.getgrgid(info.st_gid)
        group: str | None = entry.gr_name
        members = set(entry.gr_mem)
    except KeyError:
        group, members = None, set()
    mode = f"{device} ({stat.S_IMODE(info.st_mode):04o}, group {group or info.st_gid})"
    if group in (None, "root"):
        return (f"{mode} opens for root only. Fix: {_KVM_UDEV_RULE}; then sudo usermod -aG "
                f"kvm {me} and log in again (a throwaway CI runner can use MODE=\"0666\" and "
                f"skip the group)")
    if info.st_gid in os.getgroups():
        return f"{mode} cannot be opened read-write by {me}, although {me} is in its group"
    if me in members:
        return (f"{me} is in the group {group} of {mode}, but this session started before "
                f"that: log in again (or run 'newgrp {group}')")
    return (f"{mode} and {me} is not in that group: sudo usermod -aG {group} {me}, then log "
            f"in again; or, on a throwaway CI runner, open it to all with a udev rule: "
            f"{_KVM_UDEV_RULE.replace('0660', '0666')}")


_KVM_UDEV_RULE = ("echo 'KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\", "
                  "OPTIONS+=\"static_node=kvm\"' | sudo tee /etc/udev/rules.d/99-kvm.rules && "
                  "sudo groupadd -f --system kvm && sudo udevadm control --reload-rules && "
                  "sudo udevadm trigger --name-match=kvm")


def subordinate_range(kind: str, path: Path | None = None) -> tuple[int, int] | None:
    """This account's first range of subordinate ``kind`` ids ("uid" or "gid") as
    (start, count), from /etc/subuid or /etc/subgid; None when it has none."""
    path = path or Path(f"/etc/sub{kind}")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    names = {str(os.getuid()), account_name(os.getuid())}
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in names and fields[1].isdigit() \
                and fields[2].isdigit():
            return int(fields[1]), int(fields[2])
    return None


def unprivileged_build_problems() -> list[str]:
    """What stops this account from building images in a user namespace (mmdebstrap
    --mode=unshare), each with its fix; empty when nothing does."""
    problems = []
    me = account_name(os.getuid())
    for tool in ("mmdebstrap", "genext2fs", "newuidmap", "newgidmap", "unshare"):
        if find_tool(tool) is None:
            problems.append(f"{tool} is missing: sudo apt-get install {TOOL_PACKAGES[tool]}")
    for tool in ("newuidmap", "newgidmap"):
        path = find_tool(tool)
        if path and not os.stat(path).st_mode & stat.S_ISUID:
            problems.append(f"{path} is not setuid root, so it cannot map subordinate ids: "
                            f"sudo chmod u+s {path} (or reinstall the uidmap package)")
    for kind in ("uid", "gid"):
        found = subordinate_range(kind)
        if found is None:
            problems.append(f"{me} has no subordinate {kind} range in /etc/sub{kind}: "
                            f"{_subid_fix(me)}")
        elif found[1] < SUBORDINATE_IDS:
            problems.append(f"{me} has only {found[1]} subordinate {kind}s in /etc/sub{kind} "
                            f"(a Debian tree needs {SUBORDINATE_IDS}): {_subid_fix(me)}")
    if _sysctl("kernel/unprivileged_userns_clone") == "0":
        problems.append("unprivileged user namespaces are disabled: "
                        "sudo sysctl -w kernel.unprivileged_userns_clone=1 (and add it to "
                        "/etc/sysctl.d/ to keep it)")
    if _sysctl("user/max_user_namespaces") == "0":
        problems.append("user namespaces are disabled (user.max_user_namespaces is 0): "
                        "sudo sysctl -w user.max_user_namespaces=15000")
    if _sysctl("kernel/apparmor_restrict_unprivileged_userns") == "1":
        problems.append(
            "AppArmor restricts unprivileged user namespaces "
            "(kernel.apparmor_restrict_unprivileged_userns=1, Ubuntu 23.10 and later), so "
            "mmdebstrap gets no privileges inside its namespace. Allow it with a profile: "
            "printf 'abi <abi/4.0>,\\ninclude <tunables/global>\\nprofile mmdebstrap "
            "/usr/bin/mmdebstrap flags=(unconfined) {\\n  userns,\\n}\\n' | sudo tee "
            "/etc/apparmor.d/mmdebstrap && sudo apparmor_parser -r /etc/apparmor.d/mmdebstrap "
            "(or lift the restriction: sudo sysctl -w "
            "kernel.apparmor_restrict_unprivileged_userns=0)")
    if not problems:
        failure = _userns_probe()
        if failure:
            problems.append(f"a user namespace with this account's subordinate ids could not "
                            f"be made ({failure})")
    return problems


def _subid_fix(me: str) -> str:
    start = free_subordinate_start()
    end = start + SUBORDINATE_IDS - 1
    return f"sudo usermod --add-subuids {start}-{end} --add-subgids {start}-{end} {me}"


def free_subordinate_start() -> int:
    """The first subordinate id after every range already given out (100000 at least)."""
    end = 100000
    for kind in ("uid", "gid"):
        try:
            lines = Path(f"/etc/sub{kind}").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def _sysctl(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _userns_probe() -> str | None:
    """Make the namespaces mmdebstrap makes (user with subordinate ids, mount, pid, uts,
    ipc) and run ``true`` in them; None when that works, else what went wrong."""
    unshare = find_tool("unshare")
    if unshare is None:
        return "unshare is missing"
    try:
        result = subprocess.run([unshare, "--map-auto", "--map-root-user", "--mount", "--pid",
                                 "--fork", "--uts", "--ipc", "true"], capture_output=True,
                                text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if result.returncode == 0:
        return None
    error = result.stderr.strip().splitlines()
    if error and "unrecognized option" in error[0]:
        return None  # util-linux before 2.38: the static checks above are all there is
    return error[-1] if error else f"unshare exited with status {result.returncode}"


def _nested_hint() -> str:
    def read(path: str) -> str:
        try:
            return Path(path).read_text()
        except OSError:
            return ""

    if "nested_pvm" in read("/proc/cmdline") or re.search(r"^kvm_pvm ", read("/proc/modules"),
                                                         re.MULTILINE):
        return " (this is a paravirtualised nested host: kvm_pvm / nested_pvm)"
    return ""


def _probe_kvm(qemu: str, kernel: Path) -> tuple[float | None, str, str]:
    """(seconds to banner, CPU model, why not): ``-cpu host`` first, the default model next."""
    seconds, error = _boot_banner(qemu, kernel, "kvm", "host", KVM_PROBE_SECONDS)
    if seconds is not None or not error.startswith("QEMU exited"):
        return seconds, "host", f"a stock kernel {error}"
    first = error.splitlines()[0]
    seconds, second = _boot_banner(qemu, kernel, "kvm", "qemu64", KVM_PROBE_SECONDS)
    return seconds, "qemu64", (f"-cpu host fails ({first}) and with -cpu qemu64 a stock kernel "
                               f"{second}")


def _boot_banner(qemu: str, kernel: Path, accel: str, cpu: str,
                 timeout: float) -> tuple[float | None, str]:
    """Seconds until the kernel banner appears on the serial port, or None and why not."""
    with tempfile.TemporaryDirectory(prefix="probe-", dir=runtime_dir()) as tmp:
        console = Path(tmp) / "console"
        command = [qemu, "-accel", accel, "-cpu", cpu, "-m", "256", "-nodefaults",
                   "-no-user-config", "-display", "none", "-no-reboot",
                   "-serial", f"file:{console}", "-kernel", str(kernel),
                   "-append", "console=ttyS0 earlyprintk=serial panic=-1"]
        start = time.monotonic()
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE)
        try:
            while time.monotonic() - start < timeout:
                if console.exists() and _BANNER in console.read_bytes():
                    return time.monotonic() - start, ""
                if process.poll() is not None:
                    error = (process.stderr.read().decode(errors="replace").strip()
                             if process.stderr else "")
                    return None, f"QEMU exited with status {process.returncode}: {error}"
                time.sleep(0.05)
            seen = console.read_bytes()[-200:].decode(errors="replace").strip() \
                if console.exists() else ""
            last = f" (last console output: {seen.splitlines()[-1]!r})" if seen else ""
            return None, f"printed nothing within {timeout:g} s{last}"
        finally:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()


def probe_kernel() -> Path:
    """A stock kernel to probe with: ``SANDBOX_PROBE_KERNEL``, a built image's, or fetched."""
    override = os.environ.get("SANDBOX_PROBE_KERNEL")
    if override:
        return Path(override)
    images = cache_dir() / "images"
    if images.is_dir():
        kernels = sorted(images.glob("*/vmlinuz"), key=lambda p: p.stat().st_mtime)
        if kernels:
            return kernels[-1]
    fetched = cache_dir() / "host" / "probe-vmlinuz"
    if not fetched.exists():
        _fetch_probe_kernel(fetched)
    return fetched


def _fetch_probe_kernel(target: Path) -> None:
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise HostError("no kernel to probe with: build an image first (sandbox image build "
                        "debian-12) or set SANDBOX_PROBE_KERNEL to a vmlinuz")
    with tempfile.TemporaryDirectory(prefix="probe-kernel-") as tmp:
        def download(package: str) -> Path:
            result = subprocess.run(["apt-get", "download", package], cwd=tmp, timeout=120,
                                    capture_output=True, text=True, check=False)
            debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
            if result.returncode != 0 or not debs:
                raise HostError(f"could not fetch {package} to probe KVM with "
                                f"({result.stderr.strip()[-200:]}); build an image first or "
                                "set SANDBOX_PROBE_KERNEL")
            return debs[-1]

        meta = download(PROBE_KERNEL_PACKAGE)
        depends = subprocess.run(["dpkg-deb", "-f", str(meta), "Depends"], capture_output=True,
                                 text=True, check=True).stdout
        versioned = re.match(r"\s*(linux-image-[^\s,(]+)", depends)
        deb = download(versioned.group(1)) if versioned else meta
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", tmp, "--wildcards", "./boot/vmlinuz-*"],
                       stdin=tar.stdout, check=True)
        tar.wait()
        kernels = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not kernels:
            raise HostError(f"{deb.name} holds no kernel to probe with")
        tmp_target = target.with_suffix(".tmp")
        shutil.copyfile(kernels[-1], tmp_target)
        tmp_target.rename(target)


def doctor_report(*, refresh: bool = False) -> dict[str, Any]:
    """Everything ``sandbox doctor`` prints; ``ok`` is False when guests cannot run at all.

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

    # Shown on a line of its own (guests still run, under TCG), not among the problems.
    report["kvm_access"] = {"device": os.path.exists("/dev/kvm"),
                            "problem": kvm_access_problem() if os.path.exists("/dev/kvm")
                            else None}
    if report["tools"]["qemu-system-x86_64"]["path"] and report["cache"]["path"] \
            and report["runtime_dir"]["path"]:
        verdict = accel_verdict(refresh=refresh)
        report["accel"] = verdict.to_json()
        if not (verdict.kvm_usable or verdict.tcg_usable):
            report["ok"] = False
            report["problems"].append(f"guests cannot boot: {verdict.reason}")
    else:
        report["accel"] = None
    return report
