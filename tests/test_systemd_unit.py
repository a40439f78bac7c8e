"""The systemd unit: ``systemd-analyze verify`` clean, ``security`` 2.0 or better, and why
``MemoryDenyWriteExecute`` stays off; the install scripts parse."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "dicom-node.service"
INSTALLED_BIN = "/opt/dicom-node/venv/bin/dicom-node"


def _unit_here(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's console script.

    ``verify`` checks that the ExecStart binary exists; /opt/dicom-node exists only after
    systemd/install.sh, so the test uses the venv's ``dicom-node`` (same entry point).
    """
    here = Path(sys.executable).parent / "dicom-node"
    assert here.exists(), f"{here}: run scripts/setup.sh"
    text = UNIT.read_text()
    assert INSTALLED_BIN in text
    out = tmp_path / "dicom-node.service"
    out.write_text(text.replace(INSTALLED_BIN, str(here)))
    return out


def test_unit_verifies_clean(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "verify", str(_unit_here(tmp_path))],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_unit_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(_unit_here(tmp_path))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Overall exposure level for dicom-node\.service: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout[-2000:]
    assert float(m.group(1)) <= 2.0, proc.stdout


def test_unit_essentials() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=dicom-node",
                 "StateDirectory=dicom-node", "ConfigurationDirectory=dicom-node",
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "NoNewPrivileges=yes",
                 "ExecReload=/bin/kill -HUP $MAINPID", "MemoryDenyWriteExecute=no",
                 # the node supervises its worker processes; systemd signals the node only
                 # and SIGKILLs what is left of the cgroup at the stop timeout
                 "KillMode=mixed", "NotifyAccess=main"):
        assert line in text, line
    caps = [ln for ln in text.splitlines() if ln.startswith(("AmbientCapabilities=",
                                                             "CapabilityBoundingSet="))]
    assert all(ln.split("=", 1)[1] == "CAP_NET_BIND_SERVICE" for ln in caps)
    # TimeoutStopSec leaves room for the default stop_grace_s (20 s) plus the loop's stop.
    assert int(re.search(r"TimeoutStopSec=(\d+)", text).group(1)) >= 40


_WX = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)
    print("mdwe-unsupported"); sys.exit(0)
import torch
from monai.networks.nets import UNet
net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256),
           strides=(2, 2, 2, 2), num_res_units=2, norm="batch").eval()
with torch.no_grad():
    net(torch.zeros(1, 1, 96, 96, 96))
print("inference ran")
"""


def test_write_xor_execute_breaks_inference() -> None:
    """Why the unit says ``MemoryDenyWriteExecute=no``: under W^X (the kernel's
    PR_SET_MDWE, the rule that setting enforces) PyTorch's oneDNN cannot JIT its
    convolution kernels, and a spleen-bundle-sized UNet fails."""
    proc = subprocess.run([sys.executable, "-c", _WX], capture_output=True, text=True, timeout=300)
    if "mdwe-unsupported" in proc.stdout:
        # Kernel without PR_SET_MDWE: nothing to show here; the setting stays off anyway.
        assert "MemoryDenyWriteExecute=no" in UNIT.read_text()
        return
    assert proc.returncode != 0 and "could not create a primitive" in proc.stderr, \
        (proc.stdout, proc.stderr[-2000:])


def test_install_scripts_parse_and_refuse_non_root_options() -> None:
    for name in ("install.sh", "uninstall.sh"):
        script = ROOT / "systemd" / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
        proc = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
        assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def test_example_configuration_loads() -> None:
    from dicom_node.settings import load_settings

    s = load_settings(ROOT / "systemd" / "config.toml.example", env={})
    assert s.port == 104 and s.metrics_bind == "127.0.0.1" and s.destinations
    assert s.workers == 1
