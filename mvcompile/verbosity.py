"""Log verbosity for the command lines: ``-v`` (info) and ``-vv`` (debug)."""

from __future__ import annotations

import logging

import click

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
SHAPE_INFERENCE_LOGGER = "onnx_ir.passes.common.shape_inference"


def set_verbosity(verbose: int) -> None:
    """Log levels for ``verbose`` -v flags: warnings, then info, then debug."""
    import onnxruntime as ort

    logging.basicConfig(format=LOG_FORMAT)  # no-op once configured
    logging.getLogger().setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose,
                                                                           logging.DEBUG))
    # ONNX Runtime prints its own coloured copy of each error before ours; shown with -v.
    ort.set_default_logger_severity({0: 4, 1: 3}.get(verbose, 2))
    # coremltools warns on import about versions it has not tested and, off macOS, about
    # its runtime library it cannot load (we verify without it); shown with -v.
    logging.getLogger("coremltools").setLevel(logging.NOTSET if verbose else logging.ERROR)
    # onnx_ir's shape inference pass logs each failure with its traceback and goes on
    # (optimize names an input that fails onnx.checker in one paragraph); shown with -v.
    logging.getLogger(SHAPE_INFERENCE_LOGGER).setLevel(logging.NOTSET if verbose
                                                       else logging.ERROR)


def _more_verbose(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """-v given after the command adds to any given before it (``mvcompile -v build -v``)."""
    if count:
        before = ctx.parent.params.get("verbose", 0) if ctx.parent is not None else 0
        set_verbosity(before + count)


def add_verbose_option(command: click.Command) -> None:
    """Give ``command`` a -v that acts as ``mvcompile -v`` does, also after the command name
    (and on its own, as in ``torchrun -m mvcompile.train -v``); once only."""
    if any(param.name == "verbose" for param in command.params):
        return
    command.params.append(click.Option(
        ["-v", "--verbose"], count=True, expose_value=False, callback=_more_verbose,
        help="More log output (-v info, -vv debug)."))
