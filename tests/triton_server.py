"""A real NVIDIA Triton Inference Server for the tests, from PyPI ``nvidia-pytriton``.

``nvidia-pytriton`` 0.7.0 ships ``tritonserver`` 2.51 (``pytriton/tritonserver/bin``)
with the Python backend and its stubs per Python version, which run on the CPU. The
server gets its own virtual environment, ``.venv-triton`` (made by
``scripts/setup.sh`` from Debian's ``/usr/bin/python3.11``, with nvidia-pytriton,
onnxruntime and numpy; ``DICOM_NODE_TRITON_VENV`` names another): the Python-backend
stub is linked against ``libpython3.11.so.1.0`` and runs the model in that
environment's interpreter; with pyenv's 3.11.7 it fails
(``'_thread.RLock' object has no attribute '_recursion_count'``).

The wheel has no ONNX Runtime backend, so these servers load the ``<version>-python``
model of an export. As PyTriton does, the backends folder is copied next to the
test's data with the 3.11 stub put in as ``backends/python/triton_python_backend_stub``
and the wheel's bundled libraries are put on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from node_harness import free_port
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
STUB_PYTHON = "3.11"


def triton_venv() -> Path:
    """The server's virtual environment.

    Raises
    ------
    AssertionError
        If it is missing (``bash scripts/setup.sh`` makes it).
    """
    venv = Path(os.environ.get("DICOM_NODE_TRITON_VENV", ROOT / ".venv-triton"))
    site = venv / "lib" / f"python{STUB_PYTHON}" / "site-packages"
    assert (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").is_file(), (
        f"no tritonserver in {venv}: run `bash scripts/setup.sh` (it makes .venv-triton from "
        "/usr/bin/python3.11 with nvidia-pytriton, onnxruntime and numpy)")
    return venv


class TritonServer:
    """One ``tritonserver`` process on a free loopback gRPC port; stop and start it again
    on the same port.

    Parameters
    ----------
    repository : pathlib.Path
        Model repository.
    models : list of str
        Models to load (explicit model control).
    workdir : pathlib.Path
        Where the backends folder and the log go.
    """

    def __init__(self, repository: Path, models: list[str], workdir: Path) -> None:
        self.venv = triton_venv()
        site = self.venv / "lib" / f"python{STUB_PYTHON}" / "site-packages"
        dist = site / "pytriton" / "tritonserver"
        self.binary = dist / "bin" / "tritonserver"
        self.libs = site / "nvidia_pytriton.libs"
        self.repository = repository
        self.models = models
        self.workdir = workdir
        self.backends = workdir / "backends"
        if not self.backends.exists():
            shutil.copytree(dist / "backends", self.backends)
            shutil.copy2(dist / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
                         self.backends / "python" / "triton_python_backend_stub")
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.log = workdir / "tritonserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.shm_prefix = f"dicom_node_test_{os.getpid()}_{self.port}_"

    def start(self, *, wait: bool = True, timeout: float = 180.0) -> None:
        """Start the server; with ``wait``, until every model is ready."""
        env = dict(os.environ, LD_LIBRARY_PATH=str(self.libs),
                   PATH=f"{self.venv / 'bin'}:{os.environ.get('PATH', '')}")
        cmd = [str(self.binary), f"--model-repository={self.repository}",
               f"--backend-directory={self.backends}", "--model-control-mode=explicit",
               *[f"--load-model={m}" for m in self.models],
               "--allow-http=false", "--allow-metrics=false", "--allow-gpu-metrics=false",
               "--grpc-address=127.0.0.1", f"--grpc-port={self.port}",
               "--exit-timeout-secs=5", "--log-verbose=0",
               # its own shared-memory names, removed by stop(): a SIGKILLed server leaves them
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until every model is ready (generous: the Python backend starts a stub per model)."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url=self.url)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"tritonserver exited with {self.proc.returncode}:\n"
                                     + self.log.read_text(errors="replace")[-4000:])
            try:
                return client.is_server_ready() and all(client.is_model_ready(m)
                                                        for m in self.models)
            except Exception:  # noqa: BLE001 - not up yet
                return False

        try:
            wait_until("tritonserver and every model ready", ready, timeout, poll=0.5,
                       explain=lambda: "\n" + self.log.read_text(errors="replace")[-4000:])
        finally:
            client.close()

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server (SIGKILL by default: Triton gone at once, as in a crash)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)  # the server and its Python-backend stubs
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
