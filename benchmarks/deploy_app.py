"""The peer of ``benchmarks/infer_vs_deploy.py``: a MONAI Deploy App SDK application.

Runs only in the benchmark's own virtual environment (``.venv-deploy``, made by
``infer_vs_deploy.py``), never with the product. It is the SDK's spleen segmentation
example (examples/apps/ai_spleen_seg_app) with the SDK's standard operators, minus the
STL surface mesh: DICOMDataLoaderOperator -> DICOMSeriesSelectorOperator ->
DICOMSeriesToVolumeOperator -> MonaiBundleInferenceOperator (a directory bundle: its
``configs/inference.json`` and ``models/model.pt``) -> DICOMSegmentationWriterOperator.

Usage (what the benchmark runs)::

    .venv-deploy/bin/python benchmarks/deploy_app.py INPUT_DIR OUT_DIR BUNDLE_DIR

It prints one line, ``DEPLOY-TIMES {json}``: seconds from the start of the process to
the end of the imports, to the application composed, and to the end of the run.
"""

from __future__ import annotations

import json
import sys
import time

T0 = time.perf_counter()

from pathlib import Path  # noqa: E402

from pydicom.sr.codedict import codes  # noqa: E402

from monai.deploy.conditions import CountCondition  # noqa: E402
from monai.deploy.core import AppContext, Application  # noqa: E402
from monai.deploy.core.domain import Image  # noqa: E402
from monai.deploy.core.io_type import IOType  # noqa: E402
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator  # noqa: E402
from monai.deploy.operators.dicom_seg_writer_operator import (  # noqa: E402
    DICOMSegmentationWriterOperator,
    SegmentDescription,
)
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator  # noqa: E402
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator  # noqa: E402
from monai.deploy.operators.monai_bundle_inference_operator import (  # noqa: E402
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

T_IMPORTS = time.perf_counter() - T0

CT_RULES = json.dumps({"selections": [{"name": "CT Series", "conditions": {
    "StudyDescription": "(.*?)", "Modality": "(?i)CT", "SeriesDescription": "(.*?)"}}]})


class SpleenSegApp(Application):
    """Load, select the CT series, make a volume, run the bundle, write the SEG."""

    paths: dict[str, str] = {}

    def compose(self) -> None:
        # No model path in the context: the SDK would wrap the bundle folder in a generic
        # Model without a predictor; the operator loads the directory bundle itself.
        ctx = AppContext({"input": self.paths["input"], "output": self.paths["output"]})
        bundle = Path(self.paths["model"])
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1),
                                         input_folder=Path(ctx.input_path), name="loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_RULES, name="selector")
        to_volume = DICOMSeriesToVolumeOperator(self, name="to_volume")
        infer = MonaiBundleInferenceOperator(
            self, input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)], app_context=ctx,
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            bundle_path=bundle, name="bundle_infer")
        writer = DICOMSegmentationWriterOperator(
            self, segment_descriptions=[SegmentDescription(
                segment_label="Spleen", segmented_property_category=codes.SCT.Organ,
                segmented_property_type=codes.SCT.Spleen, algorithm_name="spleen demo",
                algorithm_family=codes.DCM.ArtificialIntelligence, algorithm_version="1")],
            custom_tags={"SeriesDescription": "AI generated Seg, not for clinical use."},
            output_folder=Path(ctx.output_path), name="seg_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume,
                      {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, infer, {("image", "image")})
        self.add_flow(selector, writer,
                      {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(infer, writer, {("pred", "seg_image")})


def main() -> None:
    input_dir, out_dir, bundle = sys.argv[1:4]
    SpleenSegApp.paths = {"input": input_dir, "output": out_dir, "model": bundle}
    app = SpleenSegApp()
    t_app = time.perf_counter() - T0
    app.run()
    print("DEPLOY-TIMES " + json.dumps({"imports_s": round(T_IMPORTS, 3),
                                        "app_s": round(t_app, 3),
                                        "total_s": round(time.perf_counter() - T0, 3)}),
          flush=True)


if __name__ == "__main__":
    main()
