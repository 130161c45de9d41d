"""Accuracy of built models on an image set: FP32 vs INT8 agreement, SQNR, labelled top-1."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort

from mvcompile import latency, metrics
from mvcompile.calibration.data import ImageSet
from mvcompile.errors import UserError, first_line


def predict(model: bytes | str, images: ImageSet, threads: int = 2, batch_size: int = 16,
            on_batch: Callable[[int], None] | None = None, name: str | None = None
            ) -> np.ndarray:
    """Logits of ``model`` (first output) for every image.

    A model exported for a fixed batch runs at that batch: a short last batch is padded by
    repeating its last image and the padded rows are dropped, since ONNX Runtime refuses any
    other batch. ``name`` (the file) is what error messages call the model.
    """
    where = name or (model if isinstance(model, str) else "the model")
    try:
        session = latency.make_session(model, threads=threads)
    except Exception as err:  # onnxruntime raises several types for unreadable models
        raise UserError(f"ONNX Runtime cannot load {where}: {first_line(err)}") from err
    _check_input(session, images, where)
    input_name = session.get_inputs()[0].name
    static_batch = session.get_inputs()[0].shape[0]
    fixed = isinstance(static_batch, int) and static_batch > 0
    if fixed:  # a model exported for a fixed batch (often 1)
        batch_size = static_batch
    outputs = []
    for batch in images.batches(batch_size):
        feed = _pad_batch(batch, batch_size) if fixed else batch
        outputs.append(session.run(None, {input_name: feed})[0][:len(batch)])
        if on_batch is not None:
            on_batch(len(batch))
    return np.concatenate(outputs)


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
    expected = inputs[0].shape[1:]
    actual = list(images.pixels.shape[1:])
    if any(isinstance(e, int) and e != a for e, a in zip(expected, actual, strict=False)):
        raise UserError(f"{where} expects inputs of shape [N, {', '.join(map(str, expected))}]"
                        f" but the images were prepared as {actual}; pass the model's "
                        "resolution.")


def accuracy_report(images: ImageSet, fp32_logits: np.ndarray,
                    int8_logits: np.ndarray | None = None, source: str = "the folder") -> dict:
    """{images, top1_agreement, sqnr_db, top1_fp32, top1_int8} as applicable. ``source`` names
    where the labels came from in the "not scored" note ("the folder", "digits")."""
    report: dict = {"images": len(images.pixels), "source": images.description}
    labelled = images.labels is not None and fp32_logits.shape[-1] == len(images.class_names)
    if images.labels is not None and not labelled:
        report["labels"] = (f"not scored: {source} has {len(images.class_names)} classes, "
                            f"the model {fp32_logits.shape[-1]} outputs")
    if labelled:
        report["top1_fp32"] = metrics.top1_accuracy(fp32_logits, images.labels)
    if int8_logits is not None:
        report["top1_agreement"] = metrics.top1_agreement(fp32_logits, int8_logits)
        report["sqnr_db"] = metrics.sqnr_db(fp32_logits, int8_logits)
        if labelled:
            report["top1_int8"] = metrics.top1_accuracy(int8_logits, images.labels)
    return report


def model_resolution(proto: onnx.ModelProto, name: str) -> int:
    """The static square resolution of a model's image input."""
    if not proto.graph.input:
        raise UserError(f"{name} has no inputs; eval needs one image input [N, 3, H, W].")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    sizes = [d.dim_value for d in dims[2:4] if d.HasField("dim_value")]
    if len(dims) != 4 or len(sizes) != 2 or sizes[0] != sizes[1]:
        raise UserError(f"{name} does not take a square [N, 3, R, R] image input.")
    return sizes[0]


def source_noun(data: str) -> str:
    """How messages name ``--data``: "digits", "the array" (.npy) or "the folder"."""
    if data == "digits":
        return "digits"
    return "the array" if data.endswith(".npy") else "the folder"


def _label_note(data: str) -> str:
    """Why an unlabelled ``--data`` has no top-1, and how to get one."""
    if data.endswith(".npy"):
        return ("no labels (a .npy array has none; use a folder with one subfolder per class, "
                "or digits)")
    return "no labels (use one subfolder per class)"


def find_reference(model_path: str) -> str | None:
    """For model_int8.onnx written by ``mvcompile build``, the FP32 model.onnx beside it."""
    from pathlib import Path

    candidate = Path(model_path).with_name("model.onnx")
    if Path(model_path).name == "model_int8.onnx" and candidate.is_file():
        return str(candidate)
    return None


def evaluate_file(model_path: str, data: str, reference: str | None = None,
                  limit: int | None = None,
                  on_batch: Callable[[int], None] | None = None) -> dict:
    """Top-1 of ``model_path`` on ``data``; with a reference FP32 model, agreement and SQNR."""
    from mvcompile import onnx_io
    from mvcompile.calibration.data import load_images

    model = onnx_io.load_model(model_path)  # clean errors for a missing or corrupt file
    resolution = model_resolution(model, model_path)
    images = load_images(data, resolution, limit, split="val")
    logits = predict(model.SerializeToString(), images, on_batch=on_batch, name=model_path)
    if reference is None:
        return _with_label_note(accuracy_report(images, logits, source=source_noun(data)),
                                images, data)
    reference_model = onnx_io.load_model(reference)
    reference_resolution = model_resolution(reference_model, reference)
    if reference_resolution != resolution:
        raise UserError(f"The reference {reference} takes {reference_resolution}² inputs and "
                        f"{model_path} {resolution}²; compare models built at the same "
                        "resolution.")
    ref_logits = predict(reference_model.SerializeToString(), images, on_batch=on_batch,
                         name=reference)
    if ref_logits.shape != logits.shape:
        raise UserError(f"The reference {reference} gives {ref_logits.shape[-1]} outputs per "
                        f"image and {model_path} {logits.shape[-1]}; compare models with the "
                        "same classes (an FP32 model and its INT8 build).")
    report = accuracy_report(images, ref_logits, logits, source=source_noun(data))
    report["reference"] = reference
    return _with_label_note(report, images, data)


def _with_label_note(report: dict, images: ImageSet, data: str) -> dict:
    """``report`` with a "labels" note for unlabelled data, so that the CLI's top-1 row says
    why there is no accuracy in terms of the --data actually given."""
    if images.labels is None:
        report["labels"] = _label_note(data)
    return report
