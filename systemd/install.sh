#!/bin/sh
# Install dicomnode as a systemd service: a virtual environment in /opt/dicomnode, a system user,
# the example configuration in /etc/dicomnode (kept if present), state in /var/lib/dicomnode.
set -eu
SRC="$(cd "$(dirname "$0")/.." && pwd)"
PREFIX="${PREFIX:-/opt/dicomnode}"
id dicomnode >/dev/null 2>&1 || useradd --system --home-dir /var/lib/dicomnode --shell /usr/sbin/nologin dicomnode
python3 -m venv "$PREFIX"
"$PREFIX/bin/pip" install --quiet "$SRC"
install -d -o dicomnode -g dicomnode /var/lib/dicomnode /var/lib/dicomnode/incoming
install -d /etc/dicomnode
[ -e /etc/dicomnode/dicomnode.yaml ] || install -m 0644 "$SRC/config/dicomnode.yaml" /etc/dicomnode/dicomnode.yaml
"$PREFIX/bin/dicomnode" config check /etc/dicomnode/dicomnode.yaml
install -m 0644 "$SRC/systemd/dicomnode.service" /etc/systemd/system/dicomnode.service
install -m 0644 "$SRC/systemd/dicomnode-worker@.service" /etc/systemd/system/dicomnode-worker@.service
systemctl daemon-reload
echo "installed; start with: systemctl enable --now dicomnode"
