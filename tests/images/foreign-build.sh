#!/bin/bash
# The test suite's "foreign" disk image: a Debian 12 cloud image as a distribution would
# ship it (partition table, GRUB in the boot gap for BIOS, an EFI system partition for UEFI,
# ext4 root by label, cloud-init, OpenSSH) and none of the sandbox's own parts, written to
# OUTDIR/disk.raw as an ordinary user: no root, no loop mounts. Host needs: mmdebstrap,
# uidmap (+subuid/subgid), genext2fs, e2fsprogs, fdisk (sfdisk), dosfstools, mtools.
# tests/foreign.py runs it once per version of this file and caches the result.
set -euo pipefail
OUT=$(realpath "${1:?usage: build.sh OUTDIR}"); mkdir -p "$OUT"
W=$(mktemp -d "$OUT/work.XXXXXX"); trap 'rm -rf "$W"' EXIT
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECMIRROR=${SECMIRROR:-http://deb.debian.org/debian-security}
ROOT_MB=${ROOT_MB:-2048}     # root fs size in MiB
ESP_MB=64                    # EFI system partition size

# Early config embedded into both GRUB images: find the root fs by label.
cat > "$W/early.cfg" <<'EOF'
search --no-floppy --label root --set=root
set prefix=($root)/boot/grub
configfile ($root)/boot/grub/grub.cfg
EOF
# Real GRUB menu, lives in the root fs. /boot/vmlinuz and /boot/initrd.img are
# symlinks kept up to date by the kernel postinst (link_in_boot=yes below).
cat > "$W/grub.cfg" <<'EOF'
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=1
menuentry 'Debian GNU/Linux 12 (cloud)' {
  linux /boot/vmlinuz root=LABEL=root ro console=tty0 console=ttyS0,115200n8
  initrd /boot/initrd.img
}
EOF
cat > "$W/fstab" <<'EOF'
LABEL=root  /          ext4  rw,discard,errors=remount-ro  0 1
LABEL=ESP   /boot/efi  vfat  umask=0077,nofail             0 0
EOF
echo 'manage_etc_hosts: true' > "$W/10_image.cfg"   # sudo wants the hostname resolvable

MODS="part_msdos part_gpt ext2 search search_label normal linux configfile serial terminal echo test"
# 1) Root tree -> tarball; GRUB images are built inside the tree and copied out.
#    fstab, FSTYPE and kernel-img.conf go in before the kernel: initramfs gets
#    fsck.ext4 (root can't be probed in a chroot) and the kernel postinst keeps
#    /boot/vmlinuz and /boot/initrd.img symlinks current. The locale is generated and
#    set (update-locale), as in an image made ready to ship: cloud-init's locale
#    module then has nothing to generate at first boot (30 s of it under TCG).
mmdebstrap --mode=unshare --format=tar \
  --include=linux-image-cloud-amd64,cloud-init,cloud-guest-utils,openssh-server,systemd-sysv,udev,sudo,dbus,ifupdown,isc-dhcp-client,grub-pc-bin,grub-efi-amd64-bin \
  --essential-hook='printf "do_symlinks = yes\nlink_in_boot = yes\n" > "$1/etc/kernel-img.conf"' \
  --essential-hook="upload $W/fstab /etc/fstab" \
  --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d"; echo FSTYPE=ext4 > "$1/etc/initramfs-tools/conf.d/fstype"' \
  --customize-hook='mkdir -p "$1/boot/grub" "$1/boot/efi" "$1/tmp/g"' \
  --customize-hook="upload $W/early.cfg /tmp/g/early.cfg" \
  --customize-hook="upload $W/grub.cfg /boot/grub/grub.cfg" \
  --customize-hook="upload $W/10_image.cfg /etc/cloud/cloud.cfg.d/10_image.cfg" \
  --customize-hook='sed -i "s/^# *\(en_US.UTF-8 UTF-8\)/\1/" "$1/etc/locale.gen"; chroot "$1" locale-gen; chroot "$1" update-locale LANG=en_US.UTF-8' \
  --customize-hook="chroot \"\$1\" grub-mkimage -O i386-pc -o /tmp/g/core.img -c /tmp/g/early.cfg -p /boot/grub biosdisk $MODS" \
  --customize-hook="chroot \"\$1\" grub-mkimage -O x86_64-efi -o /tmp/g/BOOTX64.EFI -c /tmp/g/early.cfg -p /boot/grub efi_gop all_video fat $MODS" \
  --customize-hook='cp "$1/usr/lib/grub/i386-pc/boot.img" "$1/tmp/g/"' \
  --customize-hook="copy-out /tmp/g/boot.img /tmp/g/core.img /tmp/g/BOOTX64.EFI $W" \
  --customize-hook='rm -rf "$1/tmp/g" "$1"/etc/ssh/ssh_host_* "$1/etc/resolv.conf"; echo localhost > "$1/etc/hostname"' \
  bookworm "$W/root.tar" \
  "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECMIRROR bookworm-security main" </dev/null

# 2) tar -> ext2 (genext2fs keeps numeric owners from the tar; 4k blocks,
#    not mmdebstrap --format=ext2's 1k), then -> ext4 with 256-byte inodes.
genext2fs -B 4096 -b $((ROOT_MB * 256)) -i 16384 -L root -a "$W/root.tar" "$W/root.img"
rm -f "$W/root.tar"
tune2fs -I 256 "$W/root.img" >/dev/null       # y2038-safe timestamps
tune2fs -O extents,uninit_bg,dir_index,has_journal,filetype,large_file,huge_file,dir_nlink,extra_isize -U random -c 0 -i 0 "$W/root.img" >/dev/null
e2fsck -fyD "$W/root.img" >/dev/null || [ $? -le 1 ]  # rc 1 = "fixed" is expected

# 3) ESP as a FAT file, filled with mtools.
mkfs.fat -C -n ESP "$W/esp.img" $((ESP_MB * 1024)) >/dev/null
mmd -i "$W/esp.img" ::/EFI ::/EFI/BOOT
mcopy -i "$W/esp.img" "$W/BOOTX64.EFI" ::/EFI/BOOT/BOOTX64.EFI

# 4) Assemble: MBR, 1 MiB gap, ESP (type ef), root (type 83).
ESP_START=2048; ESP_SECT=$((ESP_MB * 2048)); ROOT_START=$((ESP_START + ESP_SECT))
ROOT_SECT=$(( $(stat -c %s "$W/root.img") / 512 ))
D="$OUT/disk.raw"; rm -f "$D"
truncate -s $(( (ROOT_START + ROOT_SECT) * 512 )) "$D"
sfdisk -q "$D" <<EOF
label: dos
start=$ESP_START, size=$ESP_SECT, type=ef
start=$ROOT_START, size=$ROOT_SECT, type=83, bootable
EOF
dd if="$W/esp.img"  of="$D" bs=1M seek=$((ESP_START / 2048))  conv=notrunc,sparse status=none
dd if="$W/root.img" of="$D" bs=1M seek=$((ROOT_START / 2048)) conv=notrunc,sparse status=none
# BIOS: boot.img code only (first 440 bytes, keeps the partition table);
# core.img from sector 1. boot.img's default kernel_sector (1) and diskboot's
# default blocklist start (2) + length set by grub-mkimage match, no patching.
[ "$(stat -c %s "$W/core.img")" -le $(( (ESP_START - 1) * 512 )) ] || { echo "core.img too big" >&2; exit 1; }
dd if="$W/boot.img" of="$D" bs=440 count=1 conv=notrunc status=none
dd if="$W/core.img" of="$D" bs=512 seek=1 conv=notrunc status=none
echo "built $D"
