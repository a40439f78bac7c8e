"""Triton Inference Server backend against a REAL ``tritonserver`` (PyPI nvidia-pytriton
0.7.0, server 2.51, Python backend on the CPU; see ``tests/triton_server.py``).

The model repository is written by ``dicom-node models export-triton``; the server
loads its Python-backend variant (the wheel has no ONNX Runtime backend). Checked: the
configuration as Triton's own ``ModelConfig`` protobuf reads it, the same labels as the
local backend within the ONNX check's tolerance, and a job that waits - never fails,
never falls back - while Triton is down, its model missing, or killed mid-job.
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from dicom_node.foundation.errors import ConfigError
from dicom_node.queue.jobs import JobQueue, JobState
from dicom_node.queue.monitor import StabilityMonitor
from dicom_node.runtime.observability import read_state
from dicom_node.queue.sender import Sender
from dicom_node.settings import Settings
from dicom_node.tasks import default_tasks
from dicom_node.runtime.worker import Worker
from learning_helpers import store_all
from dicom_client import send
from loop_helpers import install_model, jobs_now, node_json, small_study
from node_harness import DICOM_NODE, REPO, NodeProcess
from pipelines import phantom as ph
from pipelines.export.checks import FP32_MIN_AGREEMENT
from pipelines.export.triton_repository import export_triton
from pipelines.inference import load_model
from pipelines.triton import TritonTarget, TritonUnavailableError, load_triton_model
from registry.records import ArtifactKind, Backend
from registry.store import Registry
from registry_bundles import phantom_volume
from triton_server import TritonServer
from twin_archive import Archive
from twin_archive.results import ResultStore
from waiting import wait_until

VERSION = "spleen-ct-v1"
PYTHON_MODEL = f"{VERSION}-python"


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DICOM_NODE, "--data-dir", str(data), *args], capture_output=True,
                          text=True, cwd=REPO, timeout=600, check=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A data directory with the demo model, and the model repository the CLI wrote."""
    root = tmp_path_factory.mktemp("triton")
    data = root / "data"
    assert install_model(data) == VERSION
    out = _cli(data, "models", "export-triton", VERSION, str(root / "repo"), "--cpu")
    assert f"{VERSION}: Triton model repository {root / 'repo'}" in out.stdout
    return data, root / "repo"


@pytest.fixture(scope="module")
def server(exported: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TritonServer]:
    srv = TritonServer(exported[1], [PYTHON_MODEL], tmp_path_factory.mktemp("tritonserver"))
    srv.start()
    yield srv
    srv.stop()


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_writes_a_model_repository_triton_reads(exported: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    data, repo = exported
    with Registry(data) as reg:
        onnx = next(a for a in reg.artifacts(VERSION) if a.kind is ArtifactKind.ONNX)
        checks = {v.backend: v for v in reg.verifications(VERSION)}
        assert checks[Backend.ORT_CPU].verified  # only a verified ONNX export is exported
        gpu = export_triton(reg, VERSION, tmp_path / "gpu-repo", max_batch_size=8, instances=2)
    for model, platform, backend in ((VERSION, "onnxruntime_onnx", ""),
                                     (PYTHON_MODEL, "", "python")):
        cfg = _config(repo / model / "config.pbtxt")
        assert (cfg.name, cfg.platform, cfg.backend) == (model, platform, backend)
        assert cfg.max_batch_size == 4  # twice the bundle's sw_batch_size
        (inp,), (out,) = cfg.input, cfg.output
        assert (inp.name, list(inp.dims), inp.data_type) == \
            ("image", [1, 96, 96, 96], model_config_pb2.TYPE_FP32)
        assert (out.name, list(out.dims), out.data_type) == \
            ("pred", [2, 96, 96, 96], model_config_pb2.TYPE_FP32)
        (group,) = cfg.instance_group
        assert (group.count, group.kind) == (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert cfg.HasField("dynamic_batching")
        copied = repo / model / "1" / "model.onnx"
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == onnx.sha256
    assert "onnxruntime" in (repo / PYTHON_MODEL / "1" / "model.py").read_text()
    # for NVIDIA's GPU containers: GPU instances, TensorRT as the execution accelerator
    cfg = _config(gpu.repository / VERSION / "config.pbtxt")
    assert cfg.max_batch_size == 8
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_GPU)]
    (accel,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert _config(gpu.repository / PYTHON_MODEL / "config.pbtxt").instance_group[0].kind == \
        model_config_pb2.ModelInstanceGroup.KIND_GPU
    # the node's model list says where the models run
    cfg_file = tmp_path / "node.toml"
    cfg_file.write_text('backend = "triton"\ntriton_url = "127.0.0.1:8001"\n')
    listed = subprocess.run([*DICOM_NODE, "--config", str(cfg_file), "--data-dir", str(data),
                             "models", "list"], capture_output=True, text=True, cwd=REPO,
                            timeout=300, check=True)
    assert "triton@127.0.0.1:8001" in listed.stdout


def test_backend_settings_are_validated_per_key() -> None:
    assert Settings(backend="triton", triton_url="10.0.0.9:8001").backend == "triton"
    for kwargs, key in (({"backend": "gpu"}, "backend"), ({"backend": "triton"}, "triton_url"),
                        ({"triton_url": "no port"}, "triton_url"),
                        ({"triton_variant": "tensorrt"}, "triton_variant"),
                        ({"triton_timeout_s": 0}, "triton_timeout_s"),
                        ({"triton_backoff_max_s": -1}, "triton_backoff_max_s")):
        with pytest.raises(ConfigError, match=rf"^configuration: {key}: "):
            Settings(**kwargs)


def test_triton_gives_the_labels_of_the_local_backend(exported: tuple[Path, Path],
                                                      server: TritonServer) -> None:
    data, _ = exported
    g = ph.SliceGeometry(rows=160, columns=160, slices=48, pixel_spacing=(2.5, 2.5),
                         slice_spacing=5.0)
    hu, affine, _ = phantom_volume(g, seed=4)
    with Registry(data) as reg:
        mv = reg.get(VERSION)
        local = load_model(mv, registry=reg, backend=Backend.TORCH_CPU).segment(hu, affine)
    remote = load_triton_model(mv, TritonTarget(url=server.url, variant="python"))
    result = remote.segment(hu, affine)
    agreement = float(np.mean(result.labels == local.labels))
    print(f"Triton ({remote.network.requests} requests) vs PyTorch CPU: label agreement "
          f"{agreement:.6f} on {hu.shape}; spleen voxels {int(local.labels.sum())} local, "
          f"{int(result.labels.sum())} Triton")
    assert result.backend is Backend.TRITON and remote.network.requests >= 1
    assert local.labels.sum() > 1000  # the demo model finds the phantom's spleen
    assert agreement >= FP32_MIN_AGREEMENT


def test_triton_model_missing_is_named_and_refused_to_load(exported: tuple[Path, Path],
                                                            server: TritonServer) -> None:
    data, _ = exported
    with Registry(data) as reg:
        mv = reg.get(VERSION)
    with pytest.raises(TritonUnavailableError, match=rf"waiting for Triton at {server.url} "
                       rf"\(model {VERSION}\): the model is not loaded there"):
        load_triton_model(mv, TritonTarget(url=server.url, variant="onnx"))


def _job_state(jobs: JobQueue, job_id: int) -> tuple[JobState, int, str]:
    job = jobs.get(job_id)
    return job.state, job.attempts, job.error


def test_job_waits_while_triton_is_down_or_killed_and_completes_once_it_is_back(
        exported: tuple[Path, Path], server: TritonServer, tmp_path: Path) -> None:
    data, _ = exported
    study = small_study("TRITON-1", slices=64, size=192, seed=8)
    with Archive(data) as archive:
        store_all(archive, study)
    jobs = JobQueue(data)
    results = ResultStore(data)
    sender = Sender(data, ae_title="DICOM_NODE")
    archive = Archive(data)
    monitor = StabilityMonitor(archive, jobs, default_tasks(), stable_after_s=0.01)
    (decision,) = wait_until("the series to go quiet", lambda: [
        d for d in monitor.poll() if d.series_uid == str(study[0].SeriesInstanceUID)], 30, poll=0.01)
    (job_id,) = decision.job_ids
    worker = Worker(archive=archive, jobs=jobs, results=results, sender=sender, destinations=(),
                    tasks=default_tasks(), triton=TritonTarget(url=server.url, variant="python", retry_s=1.0),
                    wait_backoff_max_s=1.0)
    try:
        # 1. Triton down: the job waits, the attempt is not counted, status says why
        server.stop()
        assert worker.run_one() is None
        state, attempts, error = _job_state(jobs, job_id)
        assert state is JobState.QUEUED and attempts == 0
        assert error.startswith(f"waiting for Triton at {server.url} (model {PYTHON_MODEL})")
        (line,) = read_state(data).waiting
        assert line.startswith(f"job {job_id}: waiting for Triton at {server.url}")
        status = _cli(data, "status").stdout
        assert f"waiting:   job {job_id}: waiting for Triton at {server.url}" in status
        # 2. Triton up without the model: still waiting, and the reason says so
        server.models = []
        server.start()

        def tried_again() -> bool:
            worker.run_one()  # claims the job once it is due again
            return "the model is not loaded there" in _job_state(jobs, job_id)[2]

        wait_until("the job waits for the missing model", tried_again, timeout=120)
        assert _job_state(jobs, job_id)[:2] == (JobState.QUEUED, 0)
        server.stop()
        # 3. the model is served; Triton is killed in the middle of the job
        server.models = [PYTHON_MODEL]
        server.start()
        worker = Worker(archive=archive, jobs=jobs, results=results, sender=sender,
                        destinations=(), tasks=default_tasks(), triton=TritonTarget(url=server.url, variant="python",
                                                             retry_s=1.0),
                        wait_backoff_max_s=1.0)  # in its thread (a registry per thread)
        worker.start()
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(url=server.url)

        def executed() -> int:
            try:
                stats = client.get_inference_statistics(PYTHON_MODEL, as_json=True)
            except Exception:  # noqa: BLE001 - the server may be going away
                return 0
            return sum(int(m.get("execution_count", 0)) for m in stats.get("model_stats", []))

        wait_until("Triton has run a batch of the job", lambda: executed() > 0, timeout=180,
                   poll=0.02)
        assert jobs.get(job_id).state is JobState.RUNNING
        server.stop()  # SIGKILL, mid-job
        client.close()
        wait_until("the interrupted job waits for Triton",
                   lambda: _job_state(jobs, job_id)[0] is JobState.QUEUED
                   and "waiting for Triton" in _job_state(jobs, job_id)[2], timeout=120)
        assert _job_state(jobs, job_id)[1] == 0
        # 4. Triton is back: the job completes, once
        server.start()
        wait_until("the job is done", lambda: jobs.get(job_id).state is JobState.DONE,
                   timeout=300)
    finally:
        worker.stop()
    job = jobs.get(job_id)
    assert job.attempts == 1 and job.error == "" and job.result_id is not None
    (result,) = [r for r in results.for_series(job.series_uid)]
    assert result.backend == "triton" and result.model_version == VERSION
    assert [s.name for s in result.segments] == ["spleen"]
    assert read_state(data).waiting == ()
    for closeable in (jobs, results, sender, archive):
        closeable.close()


def test_a_serving_node_with_backend_triton_waits_for_it_and_then_serves(
        exported: tuple[Path, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
        ) -> None:
    """``serve`` with ``backend = "triton"``: a study arrives while Triton is down; the
    node says so in ``status`` and never runs the model itself; once Triton is up, the
    result is recorded with the backend ``triton``."""
    _, repo = exported
    data = tmp_path / "data"
    install_model(data)
    srv = TritonServer(repo, [PYTHON_MODEL], tmp_path_factory.mktemp("tritonserver-node"))
    node = NodeProcess(data, config=(
        'stable_after = 1.0\ntrain_enabled = false\nbackend = "triton"\n'
        f'triton_url = "{srv.url}"\ntriton_variant = "python"\ntriton_backoff_max_s = 2\n'))
    node.start()
    try:
        assert f"inference on Triton at {srv.url} (python models)" in node.log()
        study = small_study("TRITON-NODE", slices=24, size=128, seed=9)
        assert set(send(node.port, study)) == {0}
        wait_until("the node's state names the wait for Triton", lambda: any(
            "waiting for Triton" in line for line in read_state(data).waiting), timeout=120)
        status = wait_until("status names the wait for Triton", lambda: (  # (a retry between)
            lambda text: text if "waiting for Triton" in text else None)(
                node.cli("status").stdout), timeout=60)
        assert f"waiting:   job 1: waiting for Triton at {srv.url} (model {PYTHON_MODEL})" in status
        # more waits than the job has attempts (3): none is counted, the job never fails
        wait_until("four waits", lambda: node.log().count("not counted as an attempt") >= 4,
                   timeout=120)
        (job,) = node_json(node, "jobs")
        assert job["state"] in ("queued", "running") and job["attempts"] <= 1
        assert "serving with pytorch" not in node.log()  # no silent local fallback
        srv.start()
        wait_until("the job is done", lambda: [j for j in jobs_now(data)
                                               if j.state.value == "done"], timeout=300)
        done = [j for j in node_json(node, "jobs") if j["state"] == "done"]
        assert len(done) == 1 and done[0]["attempts"] == 1
    finally:
        node.stop()
        srv.stop()
    results = ResultStore(data)
    (result,) = results.for_series(str(study[0].SeriesInstanceUID))
    results.close()
    assert result.backend == "triton" and [s.name for s in result.segments] == ["spleen"]
    assert f"model {VERSION}: serving with Triton at {srv.url}" in node.log()
