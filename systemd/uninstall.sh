#!/usr/bin/env bash
# Remove the dicom-node service (run as root).
#
#   sudo systemd/uninstall.sh          stop, disable, remove the unit and /opt/dicom-node;
#                                      KEEP the data (/var/lib/dicom-node), the
#                                      configuration (/etc/dicom-node) and the user
#   sudo systemd/uninstall.sh --purge  also delete data, configuration and the user.
#                                      The archive holds patient data and the audit log:
#                                      check your retention rules before purging.
set -euo pipefail
PURGE=0
for arg in "$@"; do
  case "$arg" in
    --purge) PURGE=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "uninstall.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "uninstall.sh: run as root (sudo)" >&2; exit 1; }

if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now dicom-node.service 2>/dev/null || true
fi
rm -f /etc/systemd/system/dicom-node.service
rm -rf /etc/systemd/system/dicom-node.service.d
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
rm -rf /opt/dicom-node
if [ "$PURGE" -eq 1 ]; then
  rm -rf /var/lib/dicom-node /etc/dicom-node
  if getent passwd dicom-node >/dev/null; then userdel dicom-node; fi
  if getent group dicom-node >/dev/null; then groupdel dicom-node 2>/dev/null || true; fi
  echo "uninstall.sh: removed the service, its data, configuration and user"
else
  echo "uninstall.sh: removed the service; kept /var/lib/dicom-node, /etc/dicom-node and the user"
fi
