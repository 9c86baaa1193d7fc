#!/bin/sh
# mmdebstrap customize hook: turn the fresh tree at $1 into a sandbox guest.
# It runs as root, or as the root of a user namespace (unshare mode) that may not read or
# write the building account's files: everything it reads was copied into the tree's
# /tmp/sandbox-build beside this script, and what it makes goes to /tmp/sandbox-build/out,
# which mmdebstrap copies out (see sandbox/image.py). Inputs from the environment:
#   SANDBOX_AUTHORIZED_KEY  the cache's public key, root's only way in
#   SANDBOX_FILES           lines "INDEX MODE GUEST_PATH" of files staged in files/INDEX
# and in the stage: files/INDEX (the recipe's files) and customize/NNNN (its customize
# commands, a file each, run in order by /bin/sh in the chroot).
set -eu
root="$1"
stage="$root/tmp/sandbox-build"
SANDBOX_AGENT="$stage/sandbox-agent"
SANDBOX_OUT="$stage/out"
mkdir -p "$SANDBOX_OUT"

echo sandbox > "$root/etc/hostname"
cat > "$root/etc/hosts" <<HOSTS
127.0.0.1 localhost
127.0.1.1 sandbox
::1 localhost ip6-localhost ip6-loopback
HOSTS
echo "/dev/vda / ext4 rw,relatime,errors=remount-ro 0 1" > "$root/etc/fstab"

# QEMU's user network always hands out the same address: configure it statically so no
# DHCP exchange sits on the boot path.
mkdir -p "$root/etc/systemd/network"
cat > "$root/etc/systemd/network/10-eth0.network" <<NET
[Match]
Name=eth0

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
DNS=10.0.2.3
NET
chroot "$root" systemctl enable systemd-networkd.service
# Nothing periodic or waiting-for-network on the boot path of a throwaway VM.
for unit in systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
            man-db.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer logrotate.timer \
            dpkg-db-backup.timer getty@tty1.service getty-static.service; do
    chroot "$root" systemctl mask "$unit" >/dev/null 2>&1 || true
done

# The SSH server is dropbear, not OpenSSH: in a fresh clone under TCG every code path is
# translated anew, and dropbear's single process (no privilege separation, no re-exec) cuts
# key exchange and authentication from ~0.45 s to ~0.15 s (measured). OpenSSH's
# sftp-server serves SFTP. Root logs in with the cache's key only; passwords are refused.
install -d -m 0700 "$root/root/.ssh"
printf '%s\n' "$SANDBOX_AUTHORIZED_KEY" > "$root/root/.ssh/authorized_keys"
chmod 0600 "$root/root/.ssh/authorized_keys"
mkdir -p "$root/etc/dropbear"
rm -f "$root/etc/dropbear/dropbear_ed25519_host_key"
chroot "$root" dropbearkey -t ed25519 -f /etc/dropbear/dropbear_ed25519_host_key >/dev/null
cat > "$root/etc/systemd/system/sandbox-sshd.service" <<UNIT
[Unit]
Description=SSH server of the pytest-qemu-sandbox guest (dropbear)
After=network.target

[Service]
# -s: no password logins; -W: a 1 MiB window so bulk output is not throttled by round trips.
ExecStart=/usr/sbin/dropbear -F -E -s -p 22 -W 1048576 -r /etc/dropbear/dropbear_ed25519_host_key
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable sandbox-sshd.service
# A recipe that installs OpenSSH as well must not fight dropbear over port 22.
chroot "$root" systemctl disable ssh.service >/dev/null 2>&1 || true
# '*' is "no password" without counting as a locked account, which would be refused.
chroot "$root" usermod -p '*' root

# A console line once the SSH server is up: the boot shows in the log, wait_for_console can use it.
cat > "$root/etc/systemd/system/sandbox-ready.service" <<UNIT
[Unit]
Description=Announce on the console that the sandbox guest is ready
After=sandbox-sshd.service systemd-networkd.service
Wants=sandbox-sshd.service

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "sandbox-guest: ready" > /dev/ttyS0'

[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable sandbox-ready.service

# The agent that gives each clone of a golden snapshot its own clock and randomness
# (needs python3 in the image; without it clones still work, sharing the golden's state).
install -D -m 0755 "$SANDBOX_AGENT" "$root/usr/local/sbin/sandbox-agent"
cat > "$root/etc/systemd/system/sandbox-agent.service" <<UNIT
[Unit]
Description=pytest-qemu-sandbox guest agent
ConditionPathExists=/usr/bin/python3

[Service]
ExecStart=/usr/local/sbin/sandbox-agent
Restart=always
# The SSH server it arms on the virtio-serial port runs in inetd mode, which logs to syslog
# only: its notices (a login per clone) would have journald take each one in, and under TCG
# every clone's journald runs that afresh (1.7k of about 51k translated blocks per clone).
LogLevelMax=warning

[Install]
WantedBy=multi-user.target
UNIT
chroot "$root" systemctl enable sandbox-agent.service

# The recipe's own files, then its customize commands.
if [ -n "${SANDBOX_FILES:-}" ]; then
    printf '%s\n' "$SANDBOX_FILES" | while read -r index mode path; do
        # In the chroot: links in the tree resolve inside it, never to the host's files.
        chroot "$root" install -D -m "$mode" "/tmp/sandbox-build/files/$index" "$path"
    done
fi
for script in "$stage"/customize/*; do
    [ -f "$script" ] || continue
    echo "customize: $(head -n 1 "$script")"
    chroot "$root" /bin/sh "/tmp/sandbox-build/customize/${script##*/}" </dev/null
done

# Kernel, initrd and the host key travel out beside the disk (direct kernel boot; the
# client pins the host key).
kernel=$(ls "$root"/boot/vmlinuz-* 2>/dev/null | sort -V | tail -n 1 || true)
if [ -n "$kernel" ]; then
    cp "$kernel" "$SANDBOX_OUT/vmlinuz"
    cp "$root/boot/initrd.img-${kernel##*/vmlinuz-}" "$SANDBOX_OUT/initrd.img"
fi
chroot "$root" dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key \
    | grep '^ssh-ed25519 ' > "$SANDBOX_OUT/ssh_host_ed25519_key.pub"
