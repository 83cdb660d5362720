#!/bin/bash
# Build the base image's root filesystem (a plain directory; no mounts, no loop devices).
#   build-rootfs.sh ROOTFS_DIR MIRROR_URL DEB_CACHE_DIR SUITE JOB_USER BUILDS_DIR CACHE_DIR
# Run as root. Called by executor/admin/imagebuild.py, which makes the disk, initrd and manifest;
# the suite, the job user and its dirs come from executor/core/imagerecipe.py (one place).
set -euo pipefail
[ $# = 7 ] || { echo "usage: $0 ROOTFS MIRROR DEB_CACHE SUITE JOB_USER BUILDS_DIR CACHE_DIR" >&2; exit 2; }
ROOTFS=$1
MIRROR=$2
CACHE=$3
SUITE=$4
JOB_USER=$5
BUILDS_DIR=$6
CACHE_DIR=$7
HERE=$(cd "$(dirname "$0")" && pwd)

log() { echo "build-rootfs: $*" >&2; }

pkgs=$(grep -v '^\s*#' "$HERE/packages.txt" | tr -s ' \n' ',' | sed 's/^,//; s/,$//')
cache_opt=()
if [ -n "$CACHE" ]; then mkdir -p "$CACHE"; cache_opt=(--cache-dir="$CACHE"); fi

log "debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include="$pkgs" "${cache_opt[@]}" "$SUITE" "$ROOTFS" "$MIRROR" >&2

# Never leave the chroot's pseudo filesystems mounted (debootstrap normally unmounts them).
for m in proc sys; do
    if mountpoint -q "$ROOTFS/$m"; then umount -l "$ROOTFS/$m"; fi
done

in_root() { chroot "$ROOTFS" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

kver=$(ls "$ROOTFS/lib/modules")
[ "$(echo "$kver" | wc -w)" = 1 ] || { log "expected exactly one kernel, got: $kver"; exit 1; }
log "kernel $kver: checking the features docker and the VM need"
cfg="$ROOTFS/boot/config-$kver"
for opt in VIRTIO_PCI VIRTIO_BLK VIRTIO_NET HW_RANDOM_VIRTIO EXT4_FS OVERLAY_FS ISO9660_FS \
           BRIDGE VETH BRIDGE_NETFILTER NF_NAT NF_CONNTRACK IP_NF_NAT IP_NF_TARGET_MASQUERADE \
           NETFILTER_XT_MATCH_ADDRTYPE NETFILTER_XT_MATCH_CONNTRACK NFT_COMPAT NF_TABLES \
           CGROUPS MEMCG CGROUP_PIDS CGROUP_BPF USER_NS SECCOMP DEVTMPFS SERIAL_8250_CONSOLE; do
    grep -Eq "^CONFIG_${opt}=(y|m)$" "$cfg" || { log "kernel lacks CONFIG_$opt"; exit 1; }
done

log "overlay files"
cp -a "$HERE/rootfs/." "$ROOTFS/"
chown -R root:root "$ROOTFS/usr/sbin/lvx-init" "$ROOTFS/usr/sbin/lvx-docker-disk" "$ROOTFS/etc/ssh/sshd_config" "$ROOTFS/etc/containerd" "$ROOTFS/etc/lvx"
chmod 0755 "$ROOTFS/usr/sbin/lvx-init" "$ROOTFS/usr/sbin/lvx-docker-disk"
chmod 0644 "$ROOTFS/etc/ssh/sshd_config" "$ROOTFS/etc/containerd/config.toml" "$ROOTFS/etc/lvx/docker-base.json"

log "job user $JOB_USER"
in_root groupadd -f docker
in_root useradd --create-home --home-dir /home/$JOB_USER --shell /bin/bash \
    --groups docker,sudo --user-group $JOB_USER
# '*': no password, but not "locked" (sshd without PAM refuses locked accounts)
in_root usermod -p '*' $JOB_USER
printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\n' "$JOB_USER" > "$ROOTFS/etc/sudoers.d/lvx-$JOB_USER"
chmod 0440 "$ROOTFS/etc/sudoers.d/lvx-$JOB_USER"
install -d -m 0755 -o root -g root "$ROOTFS/etc/ssh/authorized_keys"
for d in "$BUILDS_DIR" "$CACHE_DIR"; do install -d -m 0755 "$ROOTFS$d"; in_root chown $JOB_USER:$JOB_USER "$d"; done
install -d -m 0755 "$ROOTFS/var/lib/lvx/preload"

log "system defaults"
echo lvx > "$ROOTFS/etc/hostname"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$ROOTFS/etc/hosts"
: > "$ROOTFS/etc/fstab"
ln -sf /proc/self/mounts "$ROOTFS/etc/mtab"
rm -f "$ROOTFS/etc/resolv.conf"; : > "$ROOTFS/etc/resolv.conf"
# iptables-nft is Debian's default; docker 20.10 works with it.
# No systemd: make sure nothing tries to start services on package installs inside jobs.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"; chmod 0755 "$ROOTFS/usr/sbin/policy-rc.d"

log "removing secrets, machine identity and caches"
rm -f "$ROOTFS"/etc/ssh/ssh_host_*
: > "$ROOTFS/etc/machine-id"
rm -f "$ROOTFS/var/lib/dbus/machine-id"
rm -rf "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/var/cache/debconf/*-old "$ROOTFS"/var/lib/dpkg/*-old "$ROOTFS"/var/log/* "$ROOTFS"/tmp/* \
       "$ROOTFS"/root/.bash_history "$ROOTFS"/var/cache/ldconfig/aux-cache
rm -rf "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/*
find "$ROOTFS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
# The kernel and initrd live outside the disk (direct kernel boot); the initramfs-tools
# initrd is not used (executor/admin/imagebuild.py builds a tiny busybox one).
rm -f "$ROOTFS"/boot/initrd.img-* "$ROOTFS"/initrd.img* "$ROOTFS"/initrd.img.old
log "done"
