"""What this account may do on this host: open /dev/kvm, and build images in a user
namespace (mmdebstrap --mode=unshare). Each problem found comes with its fix."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
from pathlib import Path

from ..base.paths import account_name, find_tool

#: Host programs and the Debian package of each.
TOOL_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86", "qemu-img": "qemu-utils",
    "mmdebstrap": "mmdebstrap", "mke2fs": "e2fsprogs", "tune2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs", "genext2fs": "genext2fs", "newuidmap": "uidmap",
    "newgidmap": "uidmap", "unshare": "util-linux",
    "mkfs.fat": "dosfstools", "syslinux": "syslinux", "mcopy": "mtools",
}
#: What makes a clone's boot disk (sandbox.vm.bootdisk); without them clones keep -kernel.
BOOT_DISK_TOOLS = ("mkfs.fat", "syslinux", "mcopy")
#: Subordinate ids an unprivileged build needs: every uid and gid a Debian package may use.
SUBORDINATE_IDS = 65536


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
        return (f"{mode} is not read-write for its group, to which {me} belongs. Fix: "
                f"{_KVM_UDEV_RULE}")
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
