#!/usr/bin/env bash
# Install or upgrade dicom-node as a systemd service (run as root, from a checkout or an
# unpacked release of dicom-node).
#
#   sudo systemd/install.sh            install, or upgrade in place (data and config kept)
#   sudo systemd/install.sh --no-start install without enabling/starting the service
#
# What it does, each step idempotent:
#   - system user and group `dicom-node` (no login shell, home /var/lib/dicom-node)
#   - /opt/dicom-node/venv: a virtual environment with dicom-node and its dependencies
#     (PIP_INDEX_URL / PIP_FIND_LINKS are honoured for an offline mirror)
#   - /etc/dicom-node/config.toml from config.toml.example, only if there is none
#   - /var/lib/dicom-node (archive, queues, model registry, audit log), mode 0750
#   - /etc/systemd/system/dicom-node.service, then daemon-reload, enable, (re)start
set -euo pipefail

PREFIX=/opt/dicom-node
CONF_DIR=/etc/dicom-node
DATA_DIR=/var/lib/dicom-node
UNIT_DIR=/etc/systemd/system
USER_NAME=dicom-node
START=1
for arg in "$@"; do
  case "$arg" in
    --no-start) START=0 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "install.sh: needs Python 3.11 or newer ($PY)" >&2; exit 1; }

if ! getent group "$USER_NAME" >/dev/null; then
  groupadd --system "$USER_NAME"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
  useradd --system --gid "$USER_NAME" --home-dir "$DATA_DIR" --no-create-home \
          --shell /usr/sbin/nologin --comment "dicom-node service" "$USER_NAME"
  echo "install.sh: created system user $USER_NAME"
fi

install -d -m 0755 "$PREFIX"
if [ ! -x "$PREFIX/venv/bin/python" ]; then
  "$PY" -m venv "$PREFIX/venv"
fi
echo "install.sh: installing dicom-node into $PREFIX/venv (this takes a while the first time)"
"$PREFIX/venv/bin/python" -m pip install -q --upgrade pip
# torch: the CPU build unless a CUDA one is already there (see README, GPU).
"$PREFIX/venv/bin/python" -m pip install -q "$SRC"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

install -d -m 0750 -o root -g "$USER_NAME" "$CONF_DIR"
if [ ! -e "$CONF_DIR/config.toml" ]; then
  install -m 0640 -o root -g "$USER_NAME" "$SRC/systemd/config.toml.example" "$CONF_DIR/config.toml"
  echo "install.sh: wrote $CONF_DIR/config.toml (edit it: AE titles, destinations)"
else
  echo "install.sh: kept $CONF_DIR/config.toml"
fi
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$DATA_DIR"
"$PREFIX/venv/bin/dicom-node" --config "$CONF_DIR/config.toml" --data-dir "$DATA_DIR" status >/dev/null \
  || { echo "install.sh: the configuration does not load; fix $CONF_DIR/config.toml" >&2; exit 1; }

install -m 0644 "$SRC/systemd/dicom-node.service" "$UNIT_DIR/dicom-node.service"
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  if [ "$START" -eq 1 ]; then
    systemctl enable dicom-node.service
    systemctl restart dicom-node.service
    echo "install.sh: dicom-node running; logs: journalctl -u dicom-node -f"
  fi
else
  echo "install.sh: systemd is not running here; unit installed, start it on the target host"
fi
