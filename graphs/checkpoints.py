"""Reading MobileViT checkpoints (Hugging Face or ml-cvnets) and matching them strictly.

Supported files:

- a Hugging Face model folder holding ``model.safetensors`` or ``pytorch_model.bin``;
- ``*.safetensors`` (read with safetensors, no torch needed);
- ``*.bin`` / ``*.pt`` / ``*.pth`` pickles, read with ``torch.load(weights_only=True)`` only.

Matching is strict: every parameter of the model must be present with the right shape, and
every tensor in the checkpoint must be used (BatchNorm ``num_batches_tracked`` counters
excepted). Anything else raises :class:`~mvcompile.errors.UserError` listing missing keys,
unexpected keys and shape mismatches.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from mvcompile.errors import UserError, first_line
from mvcompile.graphs.cvnets_names import cvnets_key, looks_like_cvnets

log = logging.getLogger(__name__)

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_LAST_CONV = "mobilevit.conv_1x1_exp.convolution.weight"
_SIZE_BY_LAST_CHANNELS = {320: "xxs", 384: "xs", 640: "s"}
_SHOW = 8  # keys listed per category in an error message
# The class names, as a JSON list of strings, in the .safetensors header that `mvcompile train`
# writes and in the metadata_props of the models `mvcompile build` writes from it.
CLASS_NAMES_KEY = "mvcompile.class_names"
_OLD_CLASSES_KEY = "mvcompile.classes"  # comma-joined, by mvcompile train before class_names
_HF_PLACEHOLDER = re.compile(r"LABEL_\d+")  # transformers' default id2label entries
# The files of a `mvcompile train` run folder that say what a --weights path means.
RUN_BEST, RUN_LAST_WEIGHTS, RUN_STATE, RUN_INFO = (
    "best.safetensors", "last.safetensors", "last.pt", "run.json")


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a checkpoint file or HF folder into {name: float32 array}."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"Weights file not found: {path}. Pass the path to a .safetensors, "
                        ".bin or .pt checkpoint, a Hugging Face model folder or a mvcompile "
                        "train run folder.")
    if path.is_dir():
        shards = _shards_in_hf_folder(path)
        if shards:
            state = {name: array for shard in shards for name, array in _read_file(shard).items()}
            return _checked(state, path)
        path = _file_in_hf_folder(path)
    return _checked(_read_file(path), path)


def _read_file(path: Path) -> dict[str, np.ndarray]:
    """The tensors of one checkpoint file, by its suffix, or by its content where a
    safetensors file carries a PyTorch suffix (renamed, or saved under a .bin name)."""
    if path.suffix == ".safetensors" or (path.suffix in _PICKLE_SUFFIXES
                                         and _looks_like_safetensors(path)):
        return _read_safetensors(path)
    if path.suffix in _PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise UserError(f"Cannot read weights from {path}: expected a .safetensors, "
                    f"{', '.join(_PICKLE_SUFFIXES)} file, a Hugging Face model folder or a "
                    "mvcompile train run folder.")


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little endian, less
    than the file) and then "{"; PyTorch's zip and pickle files start otherwise."""
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    return (len(head) == 9 and head[8:9] == b"{"
            and int.from_bytes(head[:8], "little") < path.stat().st_size)


def _checked(state: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """``state``, read from ``path``, unless it is empty or holds non-finite values."""
    if not state:
        raise UserError(f"{path} holds no tensors; it is not a MobileViT checkpoint.")
    broken = [name for name, array in state.items() if not np.isfinite(array).all()]
    if broken:
        raise UserError(f"{path} holds NaN or infinite values in {len(broken)} tensor(s): "
                        f"{', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''}. The "
                        "training run that wrote it probably diverged.")
    return state


def resolve_run_weights(path: str | Path) -> tuple[Path, str | None]:
    """The weights file that ``path`` stands for, and a note when it is not ``path`` itself.

    A ``mvcompile train`` run folder (it holds ``run.json`` or ``last.pt``) means its
    ``best.safetensors``, the epoch with the best validation accuracy; the run's ``last.pt``
    (the resumable training state, torch module names) means ``last.safetensors``, the same
    epoch's weights under the graph's names. Anything else is returned as given.
    """
    path = Path(path)
    if path.is_dir() and _weights_in_hf_folder(path) is None and _is_run_folder(path):
        if (path / RUN_BEST).is_file():
            return path / RUN_BEST, (f"{path} is a mvcompile train run folder; using its "
                                     f"{RUN_BEST} (the best validation epoch).")
        if (path / RUN_LAST_WEIGHTS).is_file():
            raise UserError(f"{path} is a mvcompile train run folder without {RUN_BEST}; "
                            f"pass {path / RUN_LAST_WEIGHTS} for its latest epoch.")
        raise UserError(f"{path} is a mvcompile train run folder without {RUN_BEST}: no "
                        "epoch has finished yet. Train longer, or pass a checkpoint file.")
    if path.name == RUN_STATE and path.is_file() and (path.parent / RUN_INFO).is_file():
        last = path.with_name(RUN_LAST_WEIGHTS)
        if not last.is_file():
            raise UserError(f"{path} is the resumable training state of a mvcompile train run, "
                            f"and {last.name}, which holds its weights, is missing beside it; "
                            f"pass {path.with_name(RUN_BEST)} instead, if it exists.")
        return last, (f"{path.name} is the resumable training state; using "
                      f"{last.name} beside it, the weights of the same epoch.")
    return path, None


def _is_run_folder(folder: Path) -> bool:
    return (folder / RUN_INFO).is_file() or (folder / RUN_STATE).is_file()


def training_metadata(path: str | Path) -> dict[str, str]:
    """The ``mvcompile.*`` header entries that ``mvcompile train`` writes into its .safetensors
    checkpoints (size, patch_config, num_classes, resolution, class_names; older runs wrote
    classes), without the prefix.
    Empty for other files, and for headers that cannot be read (:func:`load_state_dict`
    reports those)."""
    return {k.removeprefix("mvcompile."): v for k, v in _mvcompile_header(path).items()}


def _mvcompile_header(path: str | Path) -> dict[str, str]:
    """The ``mvcompile.*`` entries of a .safetensors header (or of the one in an HF folder)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = _weights_in_hf_folder(path) or path
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = handle.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable header: load_state_dict says why
        return {}
    return {k: v for k, v in header.items() if k.startswith("mvcompile.")}


def hf_folder(path: Path) -> Path | None:
    """The Hugging Face folder ``path`` is, or holds the weights file of; None otherwise."""
    return path if path.is_dir() else path.parent if path.name in HF_WEIGHT_FILES else None


def checkpoint_class_names(path: str | Path) -> list[str] | None:
    """The class names of a checkpoint, in class-index order, or None when it names none.

    From the header of a ``mvcompile train`` .safetensors (``mvcompile.class_names``, or the
    comma-joined ``mvcompile.classes`` of older runs), or from ``id2label`` in the config.json
    of a Hugging Face folder (also for the weights file inside one). transformers' placeholder
    labels (``LABEL_0``, ``LABEL_1``, ...) name nothing and give None.
    """
    path = Path(path)
    folder = hf_folder(path)
    if folder is not None and (folder / "config.json").is_file():
        names = _hf_class_names(folder / "config.json")
        if names is not None:
            return names
    return class_names_from_metadata(_mvcompile_header(path))


def class_names_from_metadata(metadata: Mapping[str, str]) -> list[str] | None:
    """Class names from ``mvcompile.*`` key/value metadata (a .safetensors header, an ONNX
    model's metadata_props, an ORT session's custom metadata), or None."""
    if CLASS_NAMES_KEY in metadata:
        return parse_class_names(metadata[CLASS_NAMES_KEY])
    old = metadata.get(_OLD_CLASSES_KEY)
    return old.split(",") if old else None


def format_class_names(names: list[str]) -> str:
    """``names`` as stored under :data:`CLASS_NAMES_KEY`: a JSON list (names may hold commas);
    :func:`parse_class_names` reads it back."""
    return json.dumps(names, ensure_ascii=False)


def parse_class_names(text: str) -> list[str] | None:
    """The class names in ``text``, a JSON list of strings; None (logged) for anything else."""
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        log.warning("Ignoring %s: not a JSON list of class names (%.60s)", CLASS_NAMES_KEY, text)
        return None
    return names


def _hf_class_names(config: Path) -> list[str] | None:
    """``id2label`` of a Hugging Face config.json as a list ordered by id; None when it is
    absent, unreadable, not ids 0..N-1, or only transformers' placeholders."""
    try:
        id2label = json.loads(config.read_text()).get("id2label")
        labels = {int(k): str(v) for k, v in id2label.items()}
    except (OSError, ValueError, AttributeError, TypeError) as err:
        log.debug("No class names from %s: %s", config, err)
        return None
    if sorted(labels) != list(range(len(labels))) or not labels:
        log.debug("No class names from %s: id2label ids are not 0..N-1", config)
        return None
    names = [labels[i] for i in range(len(labels))]
    if all(_HF_PLACEHOLDER.fullmatch(n) for n in names):
        return None
    return names


def _weights_in_hf_folder(folder: Path) -> Path | None:
    """The weights file of a Hugging Face model folder, or None."""
    return next((folder / n for n in HF_WEIGHT_FILES if (folder / n).is_file()), None)


def _shards_in_hf_folder(folder: Path) -> list[Path]:
    """The shard files of a Hugging Face folder saved in pieces (``save_pretrained(...,
    max_shard_size=...)``): those its ``*.index.json`` weight map names; [] for a folder with
    one weights file or no index."""
    if _weights_in_hf_folder(folder) is not None:
        return []
    index = next((folder / f"{n}.index.json" for n in HF_WEIGHT_FILES
                  if (folder / f"{n}.index.json").is_file()), None)
    if index is None:
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"Cannot read the shard index {index} ({err}).") from err
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} is a sharded Hugging Face folder missing "
                        f"{len(missing)} of its {len(names)} weight files: "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.")
    return [folder / n for n in names]


def _file_in_hf_folder(folder: Path) -> Path:
    found = _weights_in_hf_folder(folder)
    if found is not None:
        return found
    raise UserError(f"{folder} is a folder without {' or '.join(HF_WEIGHT_FILES)}; pass a Hugging "
                    "Face model folder, a mvcompile train run folder (runs/NAME) or a "
                    "checkpoint file.")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return {k: np.asarray(v, dtype=np.float32) for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError, TypeError) as err:
        raise UserError(f"Cannot read {path} as safetensors ({err}). The file may be "
                        "truncated or not a safetensors file.") from err


def torch_load(path: str | Path, map_location: object) -> object:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary
    pickled objects; torch's pickle-protocol warnings are noise here and hidden."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=map_location, weights_only=True)


def torch_load_failure(err: Exception) -> str | None:
    """Why :func:`torch_load` failed, in words for the user, where torch's own text would
    mislead: its refusal of a pickle (also a damaged one) advises weights_only=False, i.e.
    running arbitrary code, which is not passed on. None for other failures."""
    if isinstance(err, PermissionError):  # that, not "corrupt"
        return f"cannot open it: {err.strerror or first_line(err)}"
    if "weights only" in str(err).lower():
        return ("it may be truncated or corrupt, or it holds Python objects other than "
                "tensors, which mvcompile never unpickles")
    return None


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise UserError(f"Reading {path.suffix} checkpoints needs PyTorch: install it with "
                        "`pip install torch==2.13.0` (or the [train] extra), or convert the "
                        "checkpoint to .safetensors.") from err
    try:
        obj = torch_load(path, "cpu")
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        detail = torch_load_failure(err) or f"{type(err).__name__}: {first_line(err)}"
        raise UserError(f"Cannot read {path} as a PyTorch checkpoint ({detail}). mvcompile "
                        "loads .pt/.bin files with torch.load(weights_only=True); the file may "
                        "also be corrupt or not a checkpoint.") from err
    for wrapper in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise UserError(f"{path} does not hold a state dict (found {type(obj).__name__}).")
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            state[key.removeprefix("module.")] = value.detach().float().numpy()
    return state


def to_hf_names(state: dict[str, np.ndarray], expected: list[str],
                depths: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Rename an ml-cvnets state dict to our names; split ``qkv_proj`` into q, k, v.

    Keys that map to none of ``expected`` are kept under their own name, so that the strict
    match reports them as unexpected.
    """
    if not looks_like_cvnets(list(state)):
        return state
    renamed: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for name in expected:
        key, chunk = cvnets_key(name, depths)
        if key not in state:
            continue
        used.add(key)
        tensor = state[key]
        if chunk is not None:
            third = tensor.shape[0] // 3
            tensor = tensor[chunk * third:(chunk + 1) * third]
        renamed[name] = tensor
    renamed.update({k: v for k, v in state.items() if k not in used})
    return renamed


def checkpoint_size(state: Mapping[str, np.ndarray]) -> str | None:
    """The MobileViT size (xxs, xs, s) whose last 1x1 conv has as many channels as the one in
    ``state`` (our names), or None."""
    last = state.get(_LAST_CONV)
    return None if last is None else _SIZE_BY_LAST_CHANNELS.get(last.shape[0])


class CheckpointWeights:
    """A ParamSource that serves tensors from a checkpoint and records every mismatch."""

    def __init__(self, state: dict[str, np.ndarray], source: str) -> None:
        self.state = state
        self.source = source
        self.missing: list[str] = []
        self.mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
        self.bad_values: list[str] = []  # "name: why", e.g. a negative BatchNorm variance
        self.requested: set[str] = set()

    def __call__(self, name: str, shape: tuple[int, ...], role: str) -> np.ndarray:
        self.requested.add(name)
        tensor = self.state.get(name)
        if tensor is None:
            self.missing.append(name)
        elif tuple(tensor.shape) != tuple(shape):
            self.mismatched.append((name, tuple(tensor.shape), tuple(shape)))
        elif (problem := value_problem(tensor, role)) is not None:
            self.bad_values.append(f"{name}: {problem}")
        else:
            return tensor
        return np.zeros(shape, dtype=np.float32)

    def unexpected(self) -> list[str]:
        return [k for k in self.state
                if k not in self.requested and not k.endswith(_IGNORED_SUFFIXES)]

    def raise_if_mismatched(self, model_desc: str, size: str | None = None,
                            num_classes: int | None = None) -> None:
        """Raise a :class:`UserError` describing every difference, or return if none;
        ``size`` and ``num_classes`` are those asked for (the hint suggests others only)."""
        unexpected = self.unexpected()
        if not (self.missing or unexpected or self.mismatched):
            self._raise_if_bad_values()
            return
        lines = [f"The checkpoint {self.source} does not match {model_desc}: "
                 f"{len(self.missing)} missing keys, {len(unexpected)} unexpected keys, "
                 f"{len(self.mismatched)} shape mismatches. Nothing was written."]
        lines += _listing("missing", self.missing)
        lines += _listing("unexpected", unexpected)
        lines += _listing("shape mismatch", [f"{n}: checkpoint {list(a)} vs model {list(b)}"
                                             for n, a, b in self.mismatched])
        hint = self._hint(size, num_classes) if self.missing or self.mismatched else (
            "Only unexpected keys: remove them from the checkpoint if they are not weights "
            "of this model.")
        if hint:
            lines.append(hint)
        raise UserError("\n".join(lines))

    def _raise_if_bad_values(self) -> None:
        if self.bad_values:
            raise UserError("\n".join([
                f"The checkpoint {self.source} holds {len(self.bad_values)} tensors with "
                "values no trained model has; it may be damaged. Nothing was written.",
                *_listing("bad values", self.bad_values)]))

    def _hint(self, size_asked: str | None, classes_asked: int | None) -> str:
        head = self.state.get("classifier.weight")
        if _LAST_CONV not in self.state:
            if _LAST_CONV.removeprefix("mobilevit.") in self.state:
                return ("It looks like a transformers MobileViTModel, the backbone alone (its "
                        "keys lack the mobilevit. prefix and it has no classifier): mvcompile "
                        "builds the classifier, MobileViTForImageClassification; pass the "
                        "folder of that model.")
            if not any(k.startswith("mobilevit.") for k in self.state):
                return ("It does not look like a MobileViT checkpoint (no mobilevit.* or "
                        "ml-cvnets keys).")
            return ""
        size = checkpoint_size(self.state)
        classes = f" with {head.shape[0]} classes" if head is not None else ""
        if size is None:
            return ""
        if size == size_asked and (head is None or head.shape[0] == classes_asked):
            return (f"It looks like a MobileViT-{size.upper()} checkpoint{classes}, as asked: "
                    "the mismatches are in the tensors themselves (a modified model, or a "
                    "damaged file).")
        flags = f"--size {size}" + (f" --num-classes {head.shape[0]}" if head is not None else "")
        return f"It looks like a MobileViT-{size.upper()} checkpoint{classes}; try {flags}."


def value_problem(tensor: np.ndarray, role: str) -> str | None:
    """Why ``tensor`` cannot be a trained parameter (NaN and Inf are refused on reading): a
    BatchNorm running variance (role ``bn_var``) with negative entries, which make
    sqrt(var + ε) NaN."""
    if role == "bn_var" and (tensor < 0).any():
        return f"{int((tensor < 0).sum())} negative variances (min {float(tensor.min()):.3g})"
    return None


def _listing(label: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {label}: {item}" for item in items[:_SHOW]]
    if len(items) > _SHOW:
        shown.append(f"  ... and {len(items) - _SHOW} more {label} entries")
    return shown
