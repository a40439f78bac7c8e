"""Running the real spleen bundle (random weights) on phantom volumes end to end, and
the geometry of the round trip source grid -> model grid -> source grid."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from pipelines import phantom as ph
from pipelines.inference import (
    InferenceInputError,
    LoadedModel,
    load_model,
)
from registry.records import Backend
from registry.store import Registry
from registry_bundles import phantom_volume, spleen_bundle


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("inf")
    reg = Registry(root / "data")
    reg.import_bundle(spleen_bundle(root / "spleen"), task="spleen-ct", activate=True, by="t")
    return reg


@pytest.fixture(scope="module")
def model(registry: Registry) -> LoadedModel:
    return load_model(registry.resolve("spleen-ct", "DICOM-NODE PHANTOM", "Synthetic CT"),
                      registry=registry)


def test_segment_end_to_end_returns_labels_on_the_source_grid(model: LoadedModel) -> None:
    g = ph.SliceGeometry(rows=72, columns=64, slices=24, pixel_spacing=(4.0, 4.2),
                         slice_spacing=7.5)
    hu, affine, _ = phantom_volume(g)
    before = hu.copy()
    res = model.segment(hu, affine, modality="CT")
    assert res.labels.shape == hu.shape == (24, 72, 64) and res.labels.dtype == np.uint8
    assert set(np.unique(res.labels)) <= {0, 1}
    assert np.array_equal(res.affine, affine) and np.array_equal(hu, before)
    # the network saw the bundle's 1.5 x 1.5 x 2.0 mm grid in RAS axis order (x = columns,
    # y = rows, z = slices): the same extent between the outer voxel centres
    assert res.model_grid_shape == pytest.approx((63 * 4.2 / 1.5 + 1, 71 * 4.0 / 1.5 + 1,
                                                  23 * 7.5 / 2.0 + 1), abs=1)
    assert res.backend is Backend.TORCH_CPU and res.version == "spleen-ct-v1"
    assert res.device_uid == model.version.device_uid
    assert [lab.name for lab in res.label_specs] == ["spleen"]
    t = res.timings
    assert t.preprocess_s > 0 and t.inference_s > 0 and t.postprocess_s > 0
    assert t.total_s == pytest.approx(t.preprocess_s + t.inference_s + t.postprocess_s)
    print(f"segment {hu.shape} -> model grid {res.model_grid_shape}: {t}")
    # deterministic: same input, same output
    assert np.array_equal(model.segment(hu, affine).labels, res.labels)


@pytest.mark.parametrize("geometry", [
    ph.SliceGeometry(rows=64, columns=60, slices=30, pixel_spacing=(4.5, 4.5), slice_spacing=6.0),
    # feet-first-like flipped rows and a tilted (oblique) plane
    ph.SliceGeometry(rows=60, columns=64, slices=28, pixel_spacing=(4.5, 4.2), slice_spacing=6.5,
                     row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, -1.0, 0.0)),
    ph.SliceGeometry(rows=64, columns=64, slices=30, pixel_spacing=(4.4, 4.4), slice_spacing=6.0,
                     row_direction=(0.9659258, 0.2588190, 0.0),
                     column_direction=(-0.2588190, 0.9659258, 0.0)),
], ids=["axial", "flipped", "oblique"])
def test_model_grid_geometry_and_inverse_are_exact_in_patient_space(
        model: LoadedModel, geometry: ph.SliceGeometry) -> None:
    """The preprocessed image agrees with the phantom's truth sampled at the model-grid
    voxel centres (so LPS/RAS and axis order are right), and the truth carried on the
    model grid comes back onto the source grid by the same inverse segment() uses."""
    hu, affine, anatomy = phantom_volume(geometry)
    img = model.preprocess(hu, affine)
    ras = np.asarray(img.affine, dtype=np.float64)
    shape = img.shape[1:]
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    lps = (idx @ ras[:3, :3].T + ras[:3, 3]) * np.array([-1.0, -1.0, 1.0])
    truth_model = ph.truth_at(anatomy, lps).reshape(shape)
    scaled = np.asarray(img[0])
    spleen_hu = next(o.hu for o in anatomy.organs if o.name == "spleen")
    expect = (spleen_hu + 57.0) / 221.0
    interior = truth_model == 1
    assert interior.sum() > 500
    assert np.median(scaled[interior]) == pytest.approx(expect, abs=0.05)
    assert np.median(scaled[truth_model == 4]) == pytest.approx(1.0, abs=1e-3)  # bone clipped
    # carry the truth spleen mask on the model grid back to the source grid
    onehot = torch.from_numpy(np.stack([~interior, interior]).astype(np.float32))
    back = model.to_source_grid(onehot, img, hu.shape, affine)
    truth_src = ph.truth_labels(anatomy, geometry) == 1
    dice = 2 * np.sum(back.astype(bool) & truth_src) / (back.astype(bool).sum() + truth_src.sum())
    print(f"round-trip spleen Dice on source grid: {dice:.4f}")
    assert back.shape == hu.shape and dice > 0.93


def test_wrong_modality_and_bad_input_are_refused(model: LoadedModel) -> None:
    hu = np.zeros((4, 8, 8), np.float32)
    with pytest.raises(InferenceInputError, match="is for CT, the series is MR"):
        model.segment(hu, np.eye(4), modality="MR")
    with pytest.raises(InferenceInputError, match="must be 3-D"):
        model.segment(np.zeros((8, 8), np.float32), np.eye(4))
    with pytest.raises(InferenceInputError, match="affine"):
        model.segment(hu, np.zeros((4, 4)))


def test_forced_backend_without_artifact_says_what_to_run(registry: Registry) -> None:
    from pipelines.inference import ModelLoadError

    with pytest.raises(ModelLoadError, match="no onnx artifact; run `dicom-node models optimize "
                                             "spleen-ct-v1`"):
        load_model(registry.get("spleen-ct-v1"), registry=registry, backend="onnxruntime-cpu")


@pytest.mark.parametrize("geometry", [
    ph.SliceGeometry(rows=64, columns=60, slices=30, pixel_spacing=(4.5, 4.5), slice_spacing=6.0),
    ph.SliceGeometry(rows=60, columns=64, slices=28, pixel_spacing=(4.5, 4.2), slice_spacing=6.5,
                     row_direction=(1.0, 0.0, 0.0), column_direction=(0.0, -1.0, 0.0)),
    ph.SliceGeometry(rows=64, columns=64, slices=30, pixel_spacing=(4.4, 4.4), slice_spacing=6.0,
                     row_direction=(0.9659258, 0.2588190, 0.0),
                     column_direction=(-0.2588190, 0.9659258, 0.0)),
], ids=["axial", "flipped", "oblique"])
@pytest.mark.parametrize("channels", [2, 3])
def test_labels_on_the_source_grid_agree_with_monais_inverse(
        model: LoadedModel, geometry: ph.SliceGeometry, channels: int) -> None:
    """to_source_grid (affine-mapped linear interpolation in slabs) gives the argmax of
    MONAI's own inverse of the bundle's preprocessing, up to float rounding."""
    from monai.data import MetaTensor
    from scipy.ndimage import gaussian_filter

    hu, affine, _ = phantom_volume(geometry)
    img = model.preprocess(hu, affine)
    rng = np.random.default_rng(channels)
    probs = np.stack([gaussian_filter(rng.standard_normal(img.shape[1:]), 2.0)
                      for _ in range(channels)]).astype(np.float32)
    mine = model.to_source_grid(torch.from_numpy(probs), img, hu.shape, affine)
    pred = MetaTensor(torch.from_numpy(probs), affine=img.affine, meta=dict(img.meta),
                      applied_operations=list(img.applied_operations))
    key = model.bundle.image_key
    inv = model._pre.inverse({key: pred})[key]  # MONAI checks it is the same Compose
    ref = torch.argmax(torch.as_tensor(inv), dim=0).numpy()
    assert mine.shape == ref.shape == hu.shape
    assert len(np.unique(ref)) == channels
    assert np.mean(mine != ref) < 1e-3


def test_load_runs_the_network_on_nothing_and_every_window_checks_its_channels(
        registry: Registry) -> None:
    """load_model does not run the network on a whole window (the registry did when it
    took the version in: as much work as one window of the inference); the inference
    checks the channels of the windows it runs."""
    import dataclasses

    from pipelines.errors import PipelineError
    from registry.records import LabelSpec

    calls: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, _inputs: calls.append(type(module).__name__))
    try:
        mv = registry.get("spleen-ct-v1")
        loaded = load_model(mv, registry=registry)
    finally:
        hook.remove()
    assert calls == []
    liver = LabelSpec(value=2, name="liver", code=None)
    three = LoadedModel(dataclasses.replace(mv, labels=(*mv.labels, liver)), loaded.bundle,
                        loaded.backend, loaded.network, loaded.device)
    g = ph.SliceGeometry(rows=48, columns=48, slices=12, pixel_spacing=(4.0, 4.0),
                         slice_spacing=7.5)
    hu, affine, _ = phantom_volume(g)
    with pytest.raises(PipelineError, match="the network gives 2 channels, its labels need 3"):
        three.segment(hu, affine, modality="CT")
