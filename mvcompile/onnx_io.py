"""Reading and writing ONNX files safely: validated before writing, written atomically."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Collection
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from mvcompile.errors import UserError, first_line

log = logging.getLogger(__name__)

MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses newer IR versions than this


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """An ``onnx.ModelProto`` whose IR version onnxruntime accepts."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def validate(proto: onnx.ModelProto) -> None:
    """``onnx.checker.check_model(full_check=True)``, then check that onnxruntime loads it."""
    onnx.checker.check_model(proto, full_check=True)
    ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def save_model(model: ir.Model | onnx.ModelProto, path: str | Path) -> onnx.ModelProto:
    """Validate, then write atomically (temp file + rename). Returns the written proto."""
    proto = to_proto(model)
    validate(proto)
    atomic_write_bytes(Path(path), proto.SerializeToString())
    return proto


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read an ONNX file, raising :class:`UserError` for a missing or unreadable file."""
    path = Path(path)
    if path.suffix.lower() == ".mlpackage" and path.exists():
        raise UserError(f"{path} is a Core ML package; this command reads ONNX models (.onnx, "
                        "and .ort for eval). `mvcompile bench` times .mlpackage files on macOS.")
    if path.is_dir():
        raise UserError(f"{path} is a folder; pass the path of an .onnx file.")
    if not path.is_file():
        raise UserError(f"ONNX model not found: {path}.")
    if path.suffix.lower() == ".ort":
        raise UserError(f"{path} is an ONNX Runtime (.ort) model; this command reads .onnx "
                        "files (`mvcompile bench` times .ort files).")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf raises DecodeError, onnx raises several others
        missing = _missing_external_data(path)
        if missing:
            shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise UserError(f"{path} keeps its weights in external data files that are "
                            f"missing: {shown}. Keep them beside the model under the names it "
                            "records (as `onnx.save(..., save_as_external_data=True)` wrote "
                            "them).") from err
        raise UserError(f"{path} is not a readable ONNX model ({type(err).__name__}: "
                        f"{first_line(err)}). The file may be corrupt or truncated.") from err
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path} parsed as an empty ONNX model: it is corrupt or not ONNX.")
    return proto


def _missing_external_data(path: Path) -> list[str]:
    """The external data files (relative to the model's folder) that ``path``'s tensors name
    but that do not exist; empty when the graph itself cannot be read."""
    folder = path.parent.resolve()
    return sorted(os.path.relpath(file, folder) for file in external_data_files(path)
                  if not file.is_file())


def external_data_files(path: str | Path) -> set[Path]:
    """The files (resolved paths) that the ONNX model at ``path`` keeps tensor data in; empty
    when ``path`` is missing or not a readable ONNX model."""
    path = Path(path)
    if not path.is_file():
        return set()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - not an ONNX model: it references nothing
        return set()
    return _external_files(proto, path.parent)


def _external_files(proto: onnx.ModelProto, folder: Path) -> set[Path]:
    """The resolved paths of the external data files that ``proto``'s tensors (initializers
    and attribute tensors, subgraphs included), read from ``folder``, name."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    return {(folder / ExternalDataInfo(t).location).resolve() for t in _get_all_tensors(proto)
            if uses_external_data(t)}


def _used_by_other_models(path: Path) -> set[Path]:
    """The external data files of the ``*.onnx`` models beside ``path`` (not ``path``
    itself): several models may share one data file."""
    return {file for other in path.parent.glob("*.onnx")
            if other.resolve() != path.resolve() for file in external_data_files(other)}


def replace_model(path: Path, proto: onnx.ModelProto, keep_models: Collection[Path] = ()
                  ) -> list[Path]:
    """Write ``proto`` to ``path`` atomically, then delete the external data files that the
    model previously at ``path`` used and ``proto`` does not: only files that the old model
    referenced, inside ``path``'s folder, that no other ``*.onnx`` in that folder uses and
    that the models ``keep_models`` (e.g. the input, when it is elsewhere) do not use.
    Returns those deleted.

    Until the rename, ``path`` is the old model with its data files intact; after it, the new
    one, which references none of the deleted files (so a failure in between leaves a
    consistent model, at worst with an unused data file beside it).

    A symbolic link at ``path`` stays one: the model is written to the file it points to
    (resolved to the end of a chain of links).
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    old = external_data_files(path)
    atomic_write_bytes(path, proto.SerializeToString())
    folder = path.parent.resolve()
    stale = old - _external_files(proto, path.parent)
    if not stale:  # the usual case (no external data): no other model need be read
        return []
    stale -= _used_by_other_models(path)
    for model in keep_models:
        stale -= external_data_files(model)
    removed = []
    for file in sorted(stale):
        if folder in file.parents and file.is_file():
            file.unlink()
            removed.append(file)
            log.info("Removed %s: the model previously at %s used it, the new one does not",
                     file, path)
    return removed


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # the data is on disk before the rename makes it visible
        os.chmod(tmp, _output_mode(path))  # mkstemp creates 0600
        os.replace(tmp, path)
    except OSError as err:  # a failed write() names no file (disk full): name the output
        Path(tmp).unlink(missing_ok=True)
        if err.filename is None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _output_mode(path: Path) -> int:
    """The permission bits a file written to ``path`` gets: those of the file it replaces
    (a private model stays private), else 0666 less the umask, as ``open`` would give."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
