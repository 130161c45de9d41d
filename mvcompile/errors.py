"""The one exception type the CLI turns into a clean message and a non-zero exit."""

import re

from mvcompile.table import human_bytes

# ONNX Runtime's "[ONNXRuntimeError] : 1 : FAIL : " status prefix, and the C++ source location
# and function signature it puts before an assertion ("/onnxruntime_src/x.h:91 ns::F(args) ").
_ORT_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ [^()]*\([^()]*\)\s*")
# An allocation that failed: ONNX Runtime's arena, or PyTorch's CPU allocator.
_ALLOCATION_FAILED = re.compile(
    r"Failed to allocate memory for requested buffer of size (\d+)"
    r"|(?:can't allocate memory|not enough memory): you tried to allocate (\d+) bytes")
_CUDA_OUT_OF_MEMORY = re.compile(r"CUDA out of memory\. Tried to allocate ([\d.]+ [KMGT]?i?B)")
_NUMPY_OUT_OF_MEMORY = re.compile(r"Unable to allocate ([\d.]+ [KMGTPE]?i?B)")
_ORT_NODE = re.compile(r"while running (\w+) node")


class UserError(Exception):
    """Bad input from the user: a wrong path, a mismatched checkpoint, an invalid size.

    The message is a complete paragraph meant for the person at the terminal; the CLI prints it
    without a traceback and exits with status 1.
    """


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message, or its type name when the message is empty (as
    for torch.load on an empty file). ONNX Runtime's status prefix and C++ source locations
    are dropped: they say nothing to the user."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    return _ORT_SOURCE.sub("", _ORT_STATUS.sub("", text.splitlines()[0]))


def ort_load_error(err: BaseException, where: str) -> UserError:
    """The :class:`UserError` for ONNX Runtime failing to load the model ``where``, with a
    hint for the causes we know: an IR version newer than ONNX Runtime takes (`mvcompile
    optimize` writes one it takes), and a damaged .ort file."""
    if "Unsupported model IR version" in str(err):
        hint = " `mvcompile optimize` rewrites it with an IR version that ONNX Runtime takes."
    elif where.lower().endswith(".ort"):
        hint = " The file may be corrupt, truncated or not an .ort model."
    else:
        hint = ""
    return UserError(f"ONNX Runtime cannot load {where}: {first_line(err).rstrip('.')}.{hint}")


def os_error_message(err: OSError) -> str:
    """A one-line message for an error the operating system reported (disk full, permission
    denied, a file that vanished): its own words and the path, e.g. 'No space left on device:
    out/model.onnx'."""
    reason = err.strerror or first_line(err)
    return f"{reason}: {err.filename}" if err.filename else reason


def out_of_memory_message(err: BaseException) -> str | None:
    """The message for ``err`` if it, or an error it wraps (``__cause__`` or ``__context__``:
    onnx_ir's PassError wraps a pass's MemoryError), is a failed memory allocation, else
    None. The usual cause is a large resolution: MobileViT's attention scores take 4·h·N²
    floats for N = (R/2/s)² tokens (s the stage's stride), so their memory grows with R⁴."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:  # `raise e from e` loops
        message = _allocation_message(current)
        if message is not None:
            return message
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _allocation_message(err: BaseException) -> str | None:
    """:func:`out_of_memory_message` for ``err`` itself (a MemoryError, or ONNX Runtime's,
    PyTorch's or CUDA's allocator refusing a buffer)."""
    if isinstance(err, MemoryError):
        size = _NUMPY_OUT_OF_MEMORY.search(str(err))
        asked = f": {size.group(1)} were asked for" if size else ""
    elif cuda := _CUDA_OUT_OF_MEMORY.search(str(err)):
        asked = f" on the GPU: {cuda.group(1)} more were asked for"
    else:
        match = _ALLOCATION_FAILED.search(str(err))
        if match is None:
            return None
        size = int(match.group(1) or match.group(2))
        node = _ORT_NODE.search(str(err))
        by = f" by a node of type {node.group(1)}" if node else ""
        asked = f": {human_bytes(size, 1)} were asked for{by}"
    return (f"Out of memory{asked}. A smaller input (resolution or batch) needs less; "
            "attention memory grows with the fourth power of the resolution.")


def raise_if_out_of_memory(err: BaseException) -> None:
    """Raise the :class:`UserError` of :func:`out_of_memory_message` if ``err`` is a failed
    allocation, for the handlers that would otherwise blame the model or its input."""
    message = out_of_memory_message(err)
    if message is not None:
        raise UserError(message) from err
