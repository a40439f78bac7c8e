"""orthanc/viewer.py: OHIF's app and Orthanc's DICOMweb from one origin (real Orthanc
with the Debian DICOMweb plugin; a stand-in app folder, so OHIF itself is not needed)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loop_helpers import small_study, write_files
from orthanc.server import OrthancServer
from orthanc.viewer import ViewerError, ViewerServer, app_config, ohif_dir

pytestmark = pytest.mark.orthanc


def _get(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_app_config_has_one_dicomweb_source_on_the_same_origin() -> None:
    text = app_config()
    config = json.loads(text.split("window.config = ", 1)[1].rstrip().rstrip(";"))
    (source,) = config["dataSources"]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    c = source["configuration"]
    assert (c["qidoRoot"], c["wadoRoot"], c["wadoUriRoot"]) == ("/dicom-web", "/dicom-web", "/wado")
    assert c["imageRendering"] == c["thumbnailRendering"] == "wadors"


def test_missing_ohif_is_named_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOM_NODE_OHIF_DIR", str(tmp_path / "nothing"))
    with pytest.raises(ViewerError, match="scripts/setup.sh"):
        ohif_dir()


def test_app_routes_and_dicomweb_from_one_origin(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "index.html").write_text("<html>OHIF</html>")
    (app / "x.js").write_text("let a = 1;")
    (tmp_path / "secret.txt").write_text("secret")
    study = small_study("VIEW-0001", slices=3, size=32)
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as orthanc, \
            ViewerServer(orthanc.url, root=app) as web:
        orthanc.stow([p.read_bytes() for p in write_files(study, tmp_path / "ct")])
        assert _get(web.url + "/x.js")[1].startswith("text/javascript")
        assert _get(web.url + "/viewer?StudyInstanceUIDs=1.2")[2] == b"<html>OHIF</html>"  # app route
        assert b"secret" not in _get(web.url + "/../secret.txt")[2]
        assert b"window.config" in _get(web.url + "/app-config.js")[2]
        status, ctype, body = _get(web.url + "/dicom-web/studies", "application/dicom+json")
        assert status == 200 and "json" in ctype
        uids = [s["0020000D"]["Value"][0] for s in json.loads(body)]
        assert uids == [str(study[0].StudyInstanceUID)]
        series = str(study[0].SeriesInstanceUID)
        status, _, body = _get(f"{web.url}/dicom-web/studies/{uids[0]}/series/{series}/metadata",
                               "application/dicom+json")
        assert len(json.loads(body)) == 3
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(web.url + "/x.js", data=b"", method="POST"))
        assert err.value.code == 405
