"""Accuracy of built models on an image set: FP32 vs INT8 agreement, SQNR, labelled top-1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from mvcompile import latency, metrics, stages
from mvcompile.analysis import graph_inputs
from mvcompile.calibration.data import ImageSet, few_names, is_array_file
from mvcompile.errors import UserError, first_line, ort_load_error, raise_if_out_of_memory
from mvcompile.graphs.checkpoints import class_names_from_metadata
from mvcompile.labels import match_labels


def predict(model: bytes | str | ort.InferenceSession, images: ImageSet, threads: int = 2,
            batch_size: int = 16, on_batch: Callable[[int], None] | None = None,
            name: str | None = None) -> np.ndarray:
    """Logits of ``model`` (serialized ONNX, a file path or an open session; first output) for
    every image.

    A model exported for a fixed batch runs at that batch: a short last batch is padded by
    repeating its last image and the padded rows are dropped, since ONNX Runtime refuses any
    other batch. ``name`` (the file) is what error messages call the model.
    """
    where = name or (model if isinstance(model, str) else "the model")
    session = (model if isinstance(model, ort.InferenceSession)
               else open_session(model, where, threads))
    _check_input(session, images, where)
    input_name = session.get_inputs()[0].name
    static_batch = session.get_inputs()[0].shape[0]
    fixed = isinstance(static_batch, int) and static_batch > 0
    if fixed:  # a model exported for a fixed batch (often 1)
        batch_size = static_batch
    outputs = []
    for batch in images.batches(batch_size):
        feed = _pad_batch(batch, batch_size) if fixed else batch
        outputs.append(_run_batch(session, input_name, feed, where)[:len(batch)])
        if outputs[-1].ndim and len(outputs[-1]) != len(batch):
            rows = len(outputs[-1])
            raise UserError(f"{where}'s first output has {rows} row{'s' * (rows != 1)} for a "
                            f"batch of {len(batch)} images; eval needs one row of class logits "
                            "per image, [N, classes].")
        if on_batch is not None:
            on_batch(len(batch))
    logits = np.concatenate(outputs)
    if logits.ndim != 2:
        raise UserError(f"{where}'s first output has shape {list(logits.shape)} for "
                        f"{len(images.pixels)} images, not class logits [N, classes]; eval "
                        "needs an image classifier.")
    bad = int((~np.isfinite(logits).all(axis=1)).sum()) if logits.dtype.kind == "f" else 0
    if bad:
        raise UserError(f"{where} gives NaN or infinite logits for {bad} of the "
                        f"{len(logits)} images, so they cannot be scored.")
    return logits


def _run_batch(session: ort.InferenceSession, input_name: str, feed: np.ndarray,
               where: str) -> np.ndarray:
    """The first output of ``session`` on ``feed``; UserError naming ``where`` if ONNX
    Runtime fails (a graph that hard-codes another batch in a Reshape, say)."""
    try:
        return session.run(None, {input_name: feed})[0]
    except Exception as err:  # ORT raises Fail, InvalidArgument, RuntimeException, ...
        raise_if_out_of_memory(err)
        raise UserError(f"ONNX Runtime cannot run {where} on a batch of {len(feed)} images "
                        f"({first_line(err)}). A model exported for one batch size may "
                        "declare a symbolic batch but hard-code it inside.") from err


def open_session(model: bytes | str, where: str, threads: int = 2) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for ``model``; :class:`UserError` naming ``where`` if ONNX
    Runtime cannot load it."""
    try:
        return latency.make_session(model, threads=threads)
    except Exception as err:  # onnxruntime raises several types for unreadable models
        raise ort_load_error(err, where) from err


@dataclass(frozen=True)
class OpenedModel:
    """A model file opened for evaluation."""

    path: str
    session: ort.InferenceSession
    resolution: int  # of its square image input
    class_names: list[str] | None  # from its mvcompile.class_names metadata


def open_model(path: str, threads: int = 2) -> OpenedModel:
    """Open an .onnx or .ort (ONNX Runtime format) file for :func:`predict`, with a clean
    :class:`UserError` for a missing, corrupt or non-image model."""
    from mvcompile import onnx_io

    if Path(path).suffix.lower() == ".ort":
        session = _open_ort_file(path, threads)
        inputs = session.get_inputs()  # an .ort file has no ONNX proto to read the shape from
        resolution = _square_resolution(inputs[0].shape if inputs else None, path)
    else:
        proto = onnx_io.load_model(path)  # clean errors for a missing or corrupt file
        resolution = model_resolution(proto, path)
        session = open_session(proto.SerializeToString(), path, threads)
    metadata = session.get_modelmeta().custom_metadata_map
    return OpenedModel(path, session, resolution, class_names_from_metadata(metadata))


def _open_ort_file(path: str, threads: int) -> ort.InferenceSession:
    """A session for an .ort file (ONNX Runtime reads it directly; onnx cannot)."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{path} is a folder; pass the path of an .onnx or .ort model.")
    if not file.is_file():
        raise UserError(f"ONNX Runtime model not found: {path}.")
    return open_session(path, path, threads)


def _pad_batch(batch: np.ndarray, size: int) -> np.ndarray:
    """``batch`` grown to ``size`` rows by repeating its last row (for fixed-batch models)."""
    missing = size - len(batch)
    if missing <= 0:
        return batch
    return np.concatenate([batch, np.repeat(batch[-1:], missing, axis=0)])


def _check_input(session: ort.InferenceSession, images: ImageSet, where: str) -> None:
    """Refuse models that are not one-float-image-in, logits-out, before running them."""
    inputs = session.get_inputs()
    if not inputs:
        raise UserError(f"{where} has no inputs; eval needs one image input [N, 3, H, W].")
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        found = ", ".join(f"{i.name}: {i.type}" for i in inputs)
        raise UserError(f"Evaluation needs an image model with one float32 input [N, 3, R, R]; "
                        f"{where} takes {found}.")
    if not session.get_outputs():
        raise UserError(f"{where} has no outputs; eval needs a model whose first output is "
                        "the class logits [N, classes].")
    batch, *expected = inputs[0].shape
    if batch == 0:
        raise UserError(f"{where} declares a batch size of 0 for its input; it cannot take "
                        "images.")
    actual = list(images.pixels.shape[1:])
    if len(expected) == 3 and isinstance(expected[0], int) and expected[0] != actual[0]:
        raise UserError(f"{where} takes {expected[0]}-channel inputs [N, "
                        f"{', '.join(map(str, expected))}]; eval feeds RGB images "
                        f"[N, {actual[0]}, H, W].")
    if len(expected) != len(actual) or any(
            isinstance(e, int) and e != a for e, a in zip(expected, actual, strict=True)):
        raise UserError(f"{where} expects inputs of shape [N, {', '.join(map(str, expected))}]"
                        f" but the images were prepared as {actual} (a .npy array must hold "
                        "images at the model's input size).")


def accuracy_report(images: ImageSet, fp32_logits: np.ndarray,
                    int8_logits: np.ndarray | None = None, source: str = "the folder",
                    model_classes: list[str] | None = None) -> dict:
    """{images, top1_agreement, sqnr_db, top1_fp32, top1_int8} as applicable, plus "labels"
    (why labelled data is not scored) and "notes". ``source`` names where the labels came from
    in those ("the folder", "digits"); ``model_classes`` are the models' class names, by which
    folder classes are matched (:func:`match_labels`)."""
    report: dict = {"images": len(images.pixels), "source": images.description}
    if images.skipped:
        report["skipped"] = images.skipped
    match = match_labels(images, fp32_logits.shape[-1], model_classes, source)
    labels, notes = match.labels, [match.note] if match.note else []
    if labels is not None:  # -1: an image outside the class folders, not scored
        scored = labels >= 0
        if not scored.any():
            labels, report["labels"] = None, "not scored: no image read lies in a class folder"
        elif not scored.all():
            notes.append(_unlabelled_note(images.unlabelled, int(scored.sum())))
    if match.not_scored:
        report["labels"] = match.not_scored
    if notes:
        report["notes"] = notes
    if labels is not None:
        report["top1_images"] = int(scored.sum())
        report["top1_fp32"] = metrics.top1_accuracy(fp32_logits[scored], labels[scored])
    if int8_logits is not None:
        report["top1_agreement"] = metrics.top1_agreement(fp32_logits, int8_logits)
        report["sqnr_db"] = metrics.sqnr_db(fp32_logits, int8_logits)
        if labels is not None:
            report["top1_int8"] = metrics.top1_accuracy(int8_logits[scored], labels[scored])
    return report


def _unlabelled_note(unlabelled: list[str], scored: int) -> str:
    """Why top-1 counts fewer images than were read: some lie beside the class folders."""
    others = ("1 beside them has no class and is not scored" if len(unlabelled) == 1 else
              f"{len(unlabelled)} beside them have no class and are not scored")
    return f"top-1 is over the {scored} images in class folders; {others}: {few_names(unlabelled)}"


def model_class_names(proto: onnx.ModelProto) -> list[str] | None:
    """The class names an ONNX model records (``mvcompile.class_names``), or None."""
    return class_names_from_metadata({p.key: p.value for p in proto.metadata_props})


def model_resolution(proto: onnx.ModelProto, name: str) -> int:
    """The static square resolution of a model's image input."""
    inputs = graph_inputs(proto)  # initializers listed as inputs are weights, not images
    if not inputs:
        return _square_resolution(None, name)
    dims = inputs[0].type.tensor_type.shape.dim
    return _square_resolution([d.dim_value if d.HasField("dim_value") else None for d in dims],
                              name)


def _square_resolution(shape: list | None, name: str) -> int:
    """R of an input ``shape`` [N, 3, R, R] (None: the model has no input); entries that are
    not ints are symbolic."""
    if shape is None:
        raise UserError(f"{name} has no inputs; eval needs one image input [N, 3, H, W].")
    sizes = [d for d in shape[2:4] if isinstance(d, int) and d > 0]
    if len(shape) == 4 and not sizes:
        source = (f"the .onnx that {name} was converted from" if str(name).lower()
                  .endswith(".ort") else name)
        raise UserError(f"{name} takes images of any height and width, so eval cannot tell "
                        f"which resolution to prepare them at; fix {source} with `mvcompile "
                        "optimize MODEL.onnx --resolution R -o OUT.onnx` and evaluate OUT.onnx"
                        f"{' (converted to .ort again)' if source != name else ''}.")
    if len(shape) != 4 or len(set(sizes)) != 1:  # one side free takes the other's size
        raise UserError(f"{name} does not take a square [N, 3, R, R] image input.")
    return sizes[0]


def source_noun(data: str) -> str:
    """How messages name ``--data``: "digits", "the array" (.npy) or "the folder"."""
    if data == "digits":
        return "digits"
    return "the array" if is_array_file(data) else "the folder"


def _label_note(data: str) -> str:
    """Why an unlabelled ``--data`` has no top-1, and how to get one."""
    if is_array_file(data):
        return ("no labels (a .npy array has none; use a folder with one subfolder per class, "
                "or digits)")
    return "no labels (use one subfolder per class)"


def find_reference(model_path: str) -> str | None:
    """For model_int8.onnx (or model_int8[.with_runtime_opt].ort) written by ``mvcompile
    build``, the FP32 model.onnx (model[.with_runtime_opt].ort) beside it."""
    path = Path(model_path)
    if not path.name.startswith("model_int8."):
        return None
    candidate = path.with_name("model" + path.name.removeprefix("model_int8"))
    return str(candidate) if candidate.is_file() else None


def evaluate_file(model_path: str, data: str, reference: str | None = None,
                  limit: int | None = None) -> dict:
    """Top-1 of ``model_path`` (.onnx or .ort) on ``data``; with a reference FP32 model,
    agreement and SQNR. Reports its progress (loading, then one step per image and model)
    through :mod:`mvcompile.stages`."""
    from mvcompile.calibration.data import load_images

    model = open_model(model_path)
    ref = open_model(reference) if reference is not None else None
    if ref is not None and ref.resolution != model.resolution:
        raise UserError(f"The reference {reference} takes {ref.resolution}² inputs and "
                        f"{model_path} {model.resolution}²; compare models built at the same "
                        "resolution.")
    stages.start(f"Loading images from {data}", limit or 0)
    images = load_images(data, model.resolution, limit, on_image=stages.advance, split="val")
    stages.start("Evaluating", len(images.pixels) * (2 if ref is not None else 1))
    logits = predict(model.session, images, on_batch=stages.advance, name=model_path)
    source = source_noun(data)
    if ref is None:
        report = accuracy_report(images, logits, source=source, model_classes=model.class_names)
        return with_label_note(report, images, data)
    ref_logits = predict(ref.session, images, on_batch=stages.advance, name=reference)
    if ref_logits.shape != logits.shape:
        raise UserError(f"The reference {reference} gives {ref_logits.shape[-1]} outputs per "
                        f"image and {model_path} {logits.shape[-1]}; compare models with the "
                        "same classes (an FP32 model and its INT8 build).")
    report = accuracy_report(images, ref_logits, logits, source=source,
                             model_classes=_shared_classes(model, ref))
    report["reference"] = reference
    return with_label_note(report, images, data)


def _shared_classes(model: OpenedModel, reference: OpenedModel) -> list[str] | None:
    """The class names of a model and its reference (either may lack them); refuse two
    different lists."""
    if model.class_names and reference.class_names and model.class_names != reference.class_names:
        raise UserError(f"The reference {reference.path} and {model.path} name different "
                        f"classes ({few_names(reference.class_names)} vs "
                        f"{few_names(model.class_names)}); compare models with the same "
                        "classes (an FP32 model and its INT8 build).")
    return model.class_names or reference.class_names


def with_label_note(report: dict, images: ImageSet, data: str) -> dict:
    """``report`` with a "labels" note for unlabelled data, so that the CLI's top-1 row says
    why there is no accuracy in terms of the --data actually given."""
    if images.labels is None:
        report["labels"] = _label_note(data)
    return report
