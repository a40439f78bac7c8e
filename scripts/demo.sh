#!/usr/bin/env bash
# Set up (if needed) and run the main job on embedded defaults: a real Orthanc as the
# PACS, the node, a generated abdominal CT study sent to it, the results shown.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dicom-node --data-dir "${DICOM_NODE_DEMO_DIR:-demo-data}" demo "$@"
