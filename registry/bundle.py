"""Reading MONAI bundles (Model Zoo layout) with MONAI's own bundle parser.

A bundle directory holds ``configs/metadata.json``, ``configs/inference.json`` (or
``.yaml``) and ``models/model.pt`` (a state dict) or ``models/model.ts``
(TorchScript). :func:`open_bundle` checks all of it eagerly - the network builds, the
weights load, the network runs on one patch of the declared input, and its output
channels match the label names of ``metadata.json`` - and refuses a bundle that fails
with a :class:`~registry.errors.BundleError` naming the file and what to do.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from registry.errors import BundleError
from registry.records import IntensitySettings, LabelSpec, code_for_label

LOG = logging.getLogger(__name__)

#: Transforms that read a file and add a channel axis; the node hands the
#: preprocessing a channel-first MetaTensor instead, so these are skipped.
LOADING_TRANSFORMS = frozenset({"LoadImaged", "LoadImage", "EnsureChannelFirstd",
                                "EnsureChannelFirst", "AddChanneld", "AddChannel"})
_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
_PRE_ID = "_dicom_node_preprocessing"


@dataclass(frozen=True, kw_only=True, slots=True)
class BundleInfo:
    """What the registry records about a bundle, read from its own files.

    Parameters
    ----------
    root : pathlib.Path
        Bundle directory.
    config_file, metadata_file, weights_file : pathlib.Path
        The files read.
    name, version : str
        ``name`` and ``version`` of ``metadata.json``.
    modality : str
        Input modality (``CT``), '' when the bundle does not say.
    in_channels : int
        Input channels the network takes.
    labels : tuple of LabelSpec
        Output labels, background (channel 0) excluded.
    architecture : str
        Network class and its constructor arguments, in words.
    input_spacing : (float, float, float) or None
        ``Spacingd`` pixdim (mm), when the bundle resamples.
    intensity : IntensitySettings or None
        ``ScaleIntensityRanged`` settings, when present.
    roi_size : tuple of int
        Sliding-window patch size (voxels).
    sw_batch_size : int
        Sliding-window batch size.
    """

    root: Path
    config_file: Path
    metadata_file: Path
    weights_file: Path
    name: str
    version: str
    modality: str
    in_channels: int
    labels: tuple[LabelSpec, ...]
    architecture: str
    input_spacing: tuple[float, float, float] | None
    intensity: IntensitySettings | None
    roi_size: tuple[int, ...]
    sw_batch_size: int


class OpenBundle:
    """A parsed, checked bundle: builds its network, preprocessing and inferer.

    Use :func:`open_bundle` to make one.
    """

    def __init__(self, info: BundleInfo, parser: ConfigParser, network: torch.nn.Module,
                 image_key: str, pre_targets: Sequence[str], activation: str) -> None:
        self.info = info
        self._parser = parser
        self._network = network
        self.image_key = image_key
        self.pre_targets = tuple(pre_targets)
        self.activation = activation

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The network with its weights loaded, in eval mode, on ``device``."""
        return self._network.to(device).eval()

    def preprocessing(self) -> Compose:
        """A fresh ``Compose`` of the bundle's preprocessing after loading/channel-first."""
        return self._parser.get_parsed_content(_PRE_ID, lazy=False)

    def inferer(self) -> Any:
        """A fresh instance of the bundle's inferer (``SlidingWindowInferer``)."""
        return self._parser.get_parsed_content("inferer", lazy=False)


def find_config(root: Path) -> Path:
    """The bundle's inference config file.

    Raises
    ------
    BundleError
        If none of ``configs/inference.{json,yaml,yml}`` exists.
    """
    for name in _CONFIG_NAMES:
        p = root / "configs" / name
        if p.is_file():
            return p
    raise BundleError(root / "configs", "no inference.json or inference.yaml",
                      "this is not a MONAI bundle directory (expected configs/inference.json, "
                      "configs/metadata.json and models/model.pt)")


def find_weights(root: Path) -> Path:
    """The bundle's weights: ``models/model.pt``, else ``models/model.ts``.

    Raises
    ------
    BundleError
        If neither exists.
    """
    for name in ("model.pt", "model.ts"):
        p = root / "models" / name
        if p.is_file():
            return p
    raise BundleError(root / "models" / "model.pt", "missing weights (neither models/model.pt "
                      "nor models/model.ts exists)",
                      "copy the bundle's trained weights there (the Model Zoo download holds "
                      "them; configs alone cannot be served)")


def open_bundle(root: Path | str, *, run_network: bool = True) -> OpenBundle:
    """Parse and check a MONAI bundle directory.

    Parameters
    ----------
    root : pathlib.Path or str
        The bundle directory.
    run_network : bool
        Run the network once on one zero window of the inferer's ``roi_size`` and check
        that it gives one channel per label name (default). ``False`` leaves that
        forward pass to the caller: :func:`pipelines.inference.load_model` opens a
        version the registry ran it on at import, and its inference checks the channels
        of every window it runs (a forward pass of a whole window is as much work as one
        window of the inference: 0.6 s of CPU for the demo UNet).

    Returns
    -------
    OpenBundle

    Raises
    ------
    BundleError
        Missing or unreadable files, missing weights, a network that cannot be built
        or does not accept its weights, a network output that does not match the
        label names (``run_network``), or no preprocessing/inferer; the message names
        the file and what to do.
    """
    root = Path(root).resolve()
    meta_file, config_file, weights_file = _bundle_files(root)
    meta = read_metadata(meta_file)
    parser = config_parser(root, meta_file, config_file)
    image_key = _resolve(parser, "image_key", config_file, default="image")
    modality, in_channels = _input_format(meta, image_key)
    network, architecture = _build_network(parser, config_file, weights_file)
    pre_targets, spacing, intensity = _preprocessing(parser, config_file, image_key)
    roi, sw_batch = _sliding_window(parser, config_file)
    labels = _labels(meta, meta_file, config_file, network if run_network else None,
                     in_channels, roi, weights_file)
    activation = _activation(parser)
    info = BundleInfo(root=root, config_file=config_file, metadata_file=meta_file,
                      weights_file=weights_file, name=str(meta.get("name", root.name)),
                      version=str(meta.get("version", "")), modality=modality,
                      in_channels=in_channels, labels=labels, architecture=architecture,
                      input_spacing=spacing, intensity=intensity, roi_size=roi,
                      sw_batch_size=sw_batch)
    LOG.info("bundle %s %s: %s, labels %s, spacing %s mm, roi %s", info.name, info.version,
             architecture, [lab.name for lab in labels], spacing, roi)
    return OpenBundle(info, parser, network, image_key, pre_targets, activation)


def _bundle_files(root: Path) -> tuple[Path, Path, Path]:
    """The bundle's ``metadata.json``, inference config and weights.

    Raises
    ------
    BundleError
        If ``root`` is not a directory or one of them is missing.
    """
    if not root.is_dir():
        raise BundleError(root, "not a directory", "give the path of a MONAI bundle directory")
    meta_file = root / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise BundleError(meta_file, "missing", "a MONAI bundle needs configs/metadata.json "
                          "with version and network_data_format")
    return meta_file, find_config(root), find_weights(root)


def read_metadata(meta_file: Path) -> dict[str, Any]:
    """``metadata.json`` as a dict.

    Raises
    ------
    BundleError
        If it cannot be read as JSON.
    """
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(meta_file, f"cannot be read as JSON ({exc})", "fix the JSON") from exc
    return meta


def config_parser(root: Path, meta_file: Path, config_file: Path) -> ConfigParser:
    """MONAI's parser of the bundle's configuration, rooted at ``root``, on the CPU.

    Raises
    ------
    BundleError
        If the metadata or the config cannot be parsed.
    """
    parser = ConfigParser()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on deprecated metadata names
            parser.read_meta(str(meta_file))
            parser.read_config(str(config_file))
    except Exception as exc:  # noqa: BLE001 - any parse failure of user data is refused
        raise BundleError(config_file, f"cannot be parsed ({type(exc).__name__}: {exc})",
                          "fix the syntax, or install pyyaml for a .yaml config") from exc
    parser["bundle_root"] = str(root)
    if "device" in parser:
        parser["device"] = "$torch.device('cpu')"
    return parser


def _input_format(meta: dict[str, Any], image_key: str) -> tuple[str, int]:
    """The input's modality ('' when unsaid) and channels (1 when unsaid), from
    ``network_data_format.inputs`` of ``metadata.json``."""
    in_fmt = (meta.get("network_data_format", {}).get("inputs", {}) or {})
    in_def = in_fmt.get(image_key) or (next(iter(in_fmt.values())) if in_fmt else {})
    modality = str(in_def.get("modality", "")) if isinstance(in_def, dict) else ""
    in_channels = int(in_def.get("num_channels", 1)) if isinstance(in_def, dict) else 1
    return modality, in_channels


def _sliding_window(parser: ConfigParser, config_file: Path) -> tuple[tuple[int, ...], int]:
    """The inferer's patch size (voxels) and batch size.

    Raises
    ------
    BundleError
        If there is no inferer, or it has no ``roi_size``.
    """
    inferer = _build(parser, "inferer", config_file,
                     "add an 'inferer' (e.g. SlidingWindowInferer with roi_size) to the config")
    roi = tuple(int(r) for r in getattr(inferer, "roi_size", ()) or ())
    if not roi:
        raise BundleError(config_file, f"the inferer {type(inferer).__name__} has no roi_size",
                          "use a SlidingWindowInferer with roi_size, as Model Zoo bundles do")
    return roi, int(getattr(inferer, "sw_batch_size", 1))


def _resolve(parser: ConfigParser, key: str, config_file: Path, default: Any = None) -> Any:
    if key not in parser:
        return default
    try:
        return parser.get_parsed_content(key)
    except Exception as exc:  # noqa: BLE001
        raise BundleError(config_file, f"{key!r} cannot be resolved ({exc})", f"fix {key!r}") from exc


def _build(parser: ConfigParser, key: str, config_file: Path, remedy: str) -> Any:
    if key not in parser:
        raise BundleError(config_file, f"no {key!r} definition", remedy)
    try:
        return parser.get_parsed_content(key, lazy=False)
    except Exception as exc:  # noqa: BLE001 - any instantiation failure is the bundle's
        raise BundleError(config_file, f"{key!r} cannot be built ({type(exc).__name__}: "
                          f"{_first_line(exc)})", remedy) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build_network(parser: ConfigParser, config_file: Path, weights_file: Path
                   ) -> tuple[torch.nn.Module, str]:
    key = "network_def" if "network_def" in parser else "network"
    raw = parser.get(key)
    target = raw.get("_target_", "?") if isinstance(raw, dict) else str(raw)
    remedy = (f"set {key}._target_ to a network class MONAI can import (e.g. 'UNet' or "
              f"'monai.networks.nets.SegResNet'; '{target}' was given) with valid arguments")
    if weights_file.suffix == ".ts":
        try:
            net = torch.jit.load(str(weights_file), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise BundleError(weights_file, f"cannot be loaded as TorchScript ({_first_line(exc)})",
                              "export it again with torch.jit.save, or ship models/model.pt") from exc
        # The config must still describe a buildable network (architecture record).
        _build(parser, key, config_file, remedy)
        return net.eval(), f"{target} (TorchScript)"
    net = _build(parser, key, config_file, remedy)
    if not isinstance(net, torch.nn.Module):
        raise BundleError(config_file, f"{key!r} builds a {type(net).__name__}, not a torch "
                          "module", remedy)
    try:
        state = torch.load(str(weights_file), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise BundleError(weights_file, f"cannot be read as a PyTorch state dict "
                          f"({_first_line(exc)})", "save it with torch.save(net.state_dict(), path)"
                          ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # CheckpointSaver layout
    if not isinstance(state, dict):
        raise BundleError(weights_file, f"holds a {type(state).__name__}, not a state dict",
                          "save it with torch.save(net.state_dict(), path)")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(weights_file, f"does not fit the network of {config_file.name} "
                          f"({_first_line(exc)})", "ship the weights trained for this "
                          f"{key} (same class and arguments)") from exc
    args = {k: v for k, v in raw.items() if not k.startswith("_")} if isinstance(raw, dict) else {}
    arch = f"{type(net).__module__}.{type(net).__name__}"
    if args:
        arch += "(" + ", ".join(f"{k}={_short(v)}" for k, v in args.items()) + ")"
    return net.eval(), arch


def _short(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, int, float, bool)) else str(v)


def _preprocessing(parser: ConfigParser, config_file: Path, image_key: str
                   ) -> tuple[list[str], tuple[float, float, float] | None, IntensitySettings | None]:
    pre = parser.get("preprocessing")
    if not isinstance(pre, dict) or not isinstance(pre.get("transforms"), list):
        raise BundleError(config_file, "no 'preprocessing' Compose with a 'transforms' list",
                          "define the inference preprocessing as Model Zoo bundles do")
    raw = pre["transforms"]
    keep = [i for i, t in enumerate(raw)
            if _target_name(t) not in LOADING_TRANSFORMS]
    parser[_PRE_ID] = {"_target_": "Compose",
                       "transforms": [f"@preprocessing#transforms#{i}" for i in keep]}
    _build(parser, _PRE_ID, config_file, "fix the preprocessing transforms")
    spacing: tuple[float, float, float] | None = None
    intensity: IntensitySettings | None = None
    for i in keep:
        name = _target_name(raw[i])
        base = f"preprocessing#transforms#{i}"
        if name in ("Spacingd", "Spacing"):
            pixdim = parser.get_parsed_content(f"{base}#pixdim")
            sp = tuple(float(v) for v in pixdim)
            spacing = (sp * 3)[:3] if len(sp) == 1 else sp  # type: ignore[assignment]
        elif name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            get = lambda k, d=None: (parser.get_parsed_content(f"{base}#{k}")  # noqa: E731
                                     if k in raw[i] else d)
            intensity = IntensitySettings(a_min=float(get("a_min")), a_max=float(get("a_max")),
                                          b_min=float(get("b_min", 0.0)),
                                          b_max=float(get("b_max", 1.0)),
                                          clip=bool(get("clip", False)))
    return [_target_name(raw[i]) for i in keep], spacing, intensity


def _target_name(t: Any) -> str:
    target = t.get("_target_", "") if isinstance(t, dict) else ""
    return str(target).rsplit(".", 1)[-1]


def _labels(meta: dict, meta_file: Path, config_file: Path, network: torch.nn.Module | None,
            in_channels: int, roi: tuple[int, ...], weights_file: Path) -> tuple[LabelSpec, ...]:
    outputs = meta.get("network_data_format", {}).get("outputs", {}) or {}
    out = outputs.get("pred") or (next(iter(outputs.values())) if outputs else None)
    channel_def = out.get("channel_def") if isinstance(out, dict) else None
    remedy = ('add network_data_format.outputs.pred.channel_def, e.g. {"0": "background", '
              '"1": "spleen"}, naming every output channel')
    if not isinstance(channel_def, dict) or not channel_def:
        raise BundleError(meta_file, "no label names (network_data_format.outputs.pred."
                          "channel_def is missing)", remedy)
    try:
        names = {int(k): str(v).strip() for k, v in channel_def.items()}
    except ValueError as exc:
        raise BundleError(meta_file, f"channel_def keys must be channel numbers ({exc})", remedy) from exc
    n = len(names)
    if sorted(names) != list(range(n)) or n < 2 or n > 256 or not all(names.values()):
        raise BundleError(meta_file, f"channel_def must name channels 0..N-1 (0 = background), "
                          f"N >= 2; got {channel_def}", remedy)
    if network is not None:
        _check_network(network, n, meta_file, config_file, in_channels, roi, weights_file)
    seen: set[str] = set()
    labels = []
    for value in range(1, n):
        name = names[value]
        if name.lower() in seen:
            raise BundleError(meta_file, f"label name {name!r} is used twice", remedy)
        seen.add(name.lower())
        labels.append(LabelSpec(value=value, name=name, code=code_for_label(name)))
    unmapped = [lab.name for lab in labels if lab.code is None]
    if unmapped:
        LOG.warning("%d of %d labels of %s have no SNOMED CT code in the anatomy table "
                    "(registry/data/anatomy_codes.csv); they will be written with local codes: %s",
                    len(unmapped), len(labels), meta_file, ", ".join(unmapped))
    else:
        LOG.info("all %d labels of %s have SNOMED CT codes", len(labels), meta_file)
    return tuple(labels)


def _check_network(network: torch.nn.Module, channels: int, meta_file: Path, config_file: Path,
                   in_channels: int, roi: tuple[int, ...], weights_file: Path) -> None:
    """Run the network once on one zero window: it must take the declared input and
    give one channel per label name."""
    x = torch.zeros((1, in_channels, *roi), dtype=torch.float32)
    try:
        with torch.no_grad():
            y = network(x)
    except Exception as exc:  # noqa: BLE001
        raise BundleError(config_file, f"the network does not run on a {tuple(x.shape)} input "
                          f"({_first_line(exc)})", "check in_channels and the inferer roi_size "
                          "against metadata.json") from exc
    if isinstance(y, (list, tuple)):
        y = y[0]
    if y.shape[1] != channels:
        raise BundleError(meta_file, f"channel_def names {channels} channels but the network of "
                          f"{config_file.name} ({weights_file.name}) outputs {y.shape[1]}",
                          "make channel_def name every output channel")


def _activation(parser: ConfigParser) -> str:
    """'softmax', 'sigmoid' or 'none', from the bundle's postprocessing Activationsd."""
    post = parser.get("postprocessing")
    if isinstance(post, dict):
        for t in post.get("transforms", []) or []:
            if _target_name(t) in ("Activationsd", "Activations"):
                if t.get("softmax") in (True, "true"):
                    return "softmax"
                if t.get("sigmoid") in (True, "true"):
                    return "sigmoid"
    return "softmax"
