#!/usr/bin/env bash
# Set up this host for libvirt-executor and run one demo job in a fresh VM.
#   scripts/setup.sh            everything, then the demo job
#   scripts/setup.sh --no-demo  everything but the demo (used by scripts/test.sh)
# Idempotent: a second run installs nothing, rebuilds nothing, and only runs the demo again.
# Needs root on Debian 12. Works with or without systemd.
set -euo pipefail

demo=1
for arg in "$@"; do
  case "$arg" in
    --no-demo) demo=0 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
repo=$(pwd)
say() { printf '==> %s\n' "$*"; }
listening() {  # is a daemon accepting connections on unix socket $1?
  python3 -c 'import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1])' "$1" 2>/dev/null
}

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: must run as root (it installs packages and configures libvirt)" >&2
  exit 1
fi

# Host packages: libvirt + QEMU, headers for libvirt-python, the image builder's tools.
packages=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc
  qemu-system-x86 qemu-utils dnsmasq-base iptables
  debootstrap e2fsprogs git
  # the registry mirror (distribution) and, for the vm tests, skopeo, busybox and htpasswd to
  # make and push images locally (there is no Docker Hub here)
  docker-registry skopeo busybox-static apache2-utils
  # the proxy forwarder for corporate networks ([network] proxy), run by the host agent
  squid
  # promtool (CI checks the metrics, the alert rules and their tests) and the Prometheus server
  # the metrics vm test scrapes with; the package's own service is not wanted (see below)
  prometheus
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  say "Debian packages already installed"
fi
# Debian's prometheus package enables a server on every address (:9090) scraping nothing of ours;
# we need its promtool. Switch the service off if we just installed it (an operator's own stays).
if [[ " ${missing[*]} " == *" prometheus "* ]]; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus.service >/dev/null 2>&1 || true
  elif [ -x /etc/init.d/prometheus ]; then
    /etc/init.d/prometheus stop >/dev/null 2>&1 || true
    update-rc.d prometheus disable >/dev/null 2>&1 || true
  fi
fi

# libvirt daemons: the service manager where there is one, by hand where there is none.
if [ -d /run/systemd/system ]; then
  systemctl enable --now virtlogd.socket libvirtd.socket >/dev/null 2>&1 || systemctl start libvirtd
else
  # A killed daemon leaves its socket file behind (and, for a moment, a zombie that pgrep
  # still finds): only a connect tells whether anything is listening.
  if ! listening /var/run/libvirt/virtlogd-sock; then
    say "starting virtlogd"
    rm -f /var/run/virtlogd.pid
    virtlogd -d
  fi
  if ! listening /var/run/libvirt/libvirt-sock; then
    say "starting libvirtd"
    rm -f /var/run/libvirtd.pid
    libvirtd -d
  fi
fi
for _ in $(seq 1 50); do listening /var/run/libvirt/libvirt-sock && break; sleep 0.2; done
listening /var/run/libvirt/libvirt-sock || { echo "setup.sh: libvirtd did not start" >&2; exit 1; }

# Without udev, /dev/kvm stays root-only. libvirt then finds KVM usable when it probes QEMU but
# not for the QEMU user, throws its capability cache away on every call and probes QEMU again:
# defining one domain took minutes here. Give /dev/kvm the group and mode udev would.
if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G:%a /dev/kvm)" != kvm:660 ]; then
  say "giving /dev/kvm group kvm, mode 0660 (what udev does)"
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# The Python package, in a venv inside the checkout; the command on PATH for gitlab-runner.
python=${PYTHON:-python3}
if ! [ -x .venv/bin/python ]; then
  say "creating the Python venv (.venv)"
  "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import executor, libvirt, paramiko, pycdlib, pytest" 2>/dev/null \
   || ! [ -x .venv/bin/lint-imports ] || [ pyproject.toml -nt .venv/.installed ]; then
  say "installing libvirt-executor, its dependencies and the dev tools (pytest, ruff, mypy, import-linter)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
ln -sf "$repo/.venv/bin/libvirt-executor" /usr/local/bin/libvirt-executor

say "libvirt-executor setup"
libvirt-executor setup
say "libvirt-executor image build (cached: only rebuilds when images/ changes)"
libvirt-executor image build

if [ "$demo" = 1 ]; then
  say "demo job"
  libvirt-executor demo
fi
