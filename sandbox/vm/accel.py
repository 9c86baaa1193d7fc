"""Which accelerator guests use here, and why: KVM only when it really works.

KVM counts as usable only when a stock Linux kernel gets past early start under it: on
paravirtualised nested hosts ``/dev/kvm`` opens and ``KVM_CREATE_VM`` succeeds, yet a guest
kernel hangs without printing a byte. The probe boots a real kernel under KVM (and, as a
control, under TCG) and watches the serial port for its banner; its QEMU lives like a
machine's (a run's directory, a tag, a parent-death signal), which is why it sits in this
layer. The verdict is cached per host kernel release and QEMU version, so asking again is
instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..base.entries import entry_lock
from ..base.paths import cache_dir
from ..base.processes import spawn
from ..errors import HostError
from ..host.access import kvm_access_problem
from ..host.tools import qemu_binary, qemu_version
from .files import MachineFiles, qemu_option, run_tag
from .runs import current_run

#: How long a kernel may take to print its banner under KVM before KVM counts as unusable.
KVM_PROBE_SECONDS = 3.0


#: The same under TCG (the control run that proves the probe kernel itself is sound).
TCG_PROBE_SECONDS = 8.0


#: How long to wait for another process's probe (one takes about 10 s at most).
PROBE_LOCK_TIMEOUT = 120.0


#: The probe's kernel package, fetched from the host's apt sources when no image has one.
PROBE_KERNEL_PACKAGE = "linux-image-cloud-amd64"


_BANNER = b"Linux version"


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
    #: False when the probe itself failed (no kernel to boot, the control run under TCG
    #: missed its banner): such a verdict is used once and not cached, so the next run
    #: probes again instead of keeping a transient failure for good.
    conclusive: bool = True

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
    with entry_lock(path, timeout=PROBE_LOCK_TIMEOUT):
        if path.exists() and not refresh:
            return AccelVerdict(**json.loads(path.read_text()))
        verdict = _probe()
        if verdict.conclusive:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(verdict.to_json(), indent=2))
            tmp.rename(path)
        else:
            path.unlink(missing_ok=True)
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
                            reason=kvm_problem or f"could not probe KVM (asked again next "
                                                  f"time): {exc}",
                            probe_seconds=round(time.monotonic() - started, 2),
                            conclusive=kvm_problem is not None, **common)
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
        accel, reason = "tcg", kvm_problem if tcg_ok else f"{kvm_problem}; {tcg_note}"
    else:
        accel = "tcg"
        reason = f"/dev/kvm opens, but under KVM {kvm_error}; {tcg_note}{_nested_hint()}"
    conclusive = tcg_ok or accel == "kvm"
    if not conclusive:  # the probe itself failed (its kernel, a loaded host): not a verdict
        reason = f"the KVM probe was inconclusive (asked again next time): {reason}"
    return AccelVerdict(accel=accel, kvm_usable=kvm_seconds is not None, kvm_cpu=kvm_cpu,
                        tcg_usable=tcg_ok, reason=reason,
                        probe_seconds=round(time.monotonic() - started, 2),
                        conclusive=conclusive, **common)


def _kvm_device_problem() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this host (enable virtualisation, or load kvm_intel/kvm_amd)"
    return kvm_access_problem()


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
    """Seconds until the kernel banner appears on the serial port, or None and why not.

    The probe's QEMU lives like a machine's (under KVM on the hosts the probe is for, it
    hangs for ever): in a directory of this process's run with a pid file, tagged with the
    run, and killed by a parent-death signal when this process dies (``sandbox doctor``
    killed mid-probe), or by the next run's reaper."""
    run = current_run()
    directory = Path(tempfile.mkdtemp(prefix=f"probe-{accel}-", dir=run.path))
    files = MachineFiles(directory)
    try:
        console = directory / "console"
        command = [qemu, "-name", qemu_option(run_tag(run.id, directory.name)),
                   "-accel", accel, "-cpu", cpu, "-m", "256", "-nodefaults",
                   "-no-user-config", "-display", "none", "-no-reboot",
                   "-chardev", f"file,id=console0,path={qemu_option(console)}",
                   "-serial", "chardev:console0", "-pidfile", str(files.pidfile),
                   "-kernel", str(kernel),
                   "-append", "console=ttyS0 earlyprintk=serial panic=-1"]
        start = time.monotonic()
        process = spawn(command, die_with_parent=True, stderr=subprocess.PIPE)
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
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def probe_kernel() -> Path:
    """A stock kernel to probe with: ``SANDBOX_PROBE_KERNEL``, a built image's, or fetched."""
    override = os.environ.get("SANDBOX_PROBE_KERNEL")
    if override:
        if not Path(override).is_file():
            raise HostError(f"SANDBOX_PROBE_KERNEL={override!r} is not a file; point it at a "
                            "vmlinuz or unset it")
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
