"""The ``mvcompile`` command line. Printing happens here and nowhere else."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from mvcompile import analysis, onnx_io
from mvcompile.errors import UserError
from mvcompile.graphs.mobilevit import SIZES
from mvcompile.table import format_table, human_bytes, human_count


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn UserError into 'Error: ...' on stderr and exit status 1, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UserError as err:
            click.secho(f"Error: {err}", fg="red", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="mvcompile")
def main(verbose: int) -> None:
    """mvcompile: compile and quantize MobileViT for ONNX Runtime and Core ML."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--size", type=click.Choice(SIZES), default="xxs", show_default=True,
              help="MobileViT variant: xxs (1.3 M params), xs (2.3 M) or s (5.6 M).")
@click.option("--weights", type=click.Path(), default=None,
              help="Checkpoint to load: Hugging Face folder, .safetensors, .bin, or an ml-cvnets "
                   ".pt. Without it the weights are seeded random (not trained).")
@click.option("--resolution", type=int, default=256, show_default=True,
              help="Square input size; must be a multiple of 64 (stride 32 and the patches).")
@click.option("--patch-config", type=click.Choice(["A", "B"]), default="A", show_default=True,
              help="Patch sizes of the three MobileViT blocks: A = (2,2,2), B = (8,4,2), "
                   "faster and slightly less accurate.")
@click.option("--num-classes", type=int, default=1000, show_default=True,
              help="Classifier outputs; must match the checkpoint when --weights is given.")
@click.option("-o", "--out-dir", type=click.Path(), default=None,
              help="Output folder for model.onnx and report.json [default: out/mobilevit_SIZE].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for the random weights used without --weights.")
@click.option("--latency-runs", type=int, default=20, show_default=True,
              help="Timed ONNX Runtime runs for the latency in the summary (0 skips timing).")
@click.option("--threads", type=int, default=2, show_default=True,
              help="ONNX Runtime intra-op threads for the latency measurement.")
@_user_errors
def build(size: str, weights: str | None, resolution: int, patch_config: str, num_classes: int,
          out_dir: str | None, seed: int, latency_runs: int, threads: int) -> None:
    """Build MobileViT as an ONNX graph, write model.onnx and report.json, print a summary."""
    from mvcompile.builder import BuildOptions
    from mvcompile.builder import build as run_build

    options = BuildOptions(size=size, weights=weights, resolution=resolution,
                           patch_config=patch_config, num_classes=num_classes,
                           out_dir=out_dir or f"out/mobilevit_{size}", seed=seed,
                           latency_runs=latency_runs, threads=threads)
    if weights is None:
        click.secho(f"Note: no --weights given, so the weights are random (seed {seed}); "
                    "the model is not trained.", fg="yellow", err=True)
    with click.progressbar(length=max(latency_runs, 1), label="Timing with ONNX Runtime",
                           file=sys.stderr) as bar:
        result = run_build(options, on_latency_run=lambda: bar.update(1))
    click.echo(_build_summary(result.report, result.model_path, result.report_path))


def _build_summary(report: dict, model_path: object, report_path: object) -> str:
    m = report["model"]
    lat = report["latency"]
    rows = [
        ("model", f"MobileViT-{m['size'].upper()}, {m['resolution']}x{m['resolution']}, "
                  f"patches {tuple(m['patch_sizes'])}, {m['num_classes']} classes"),
        ("weights", report["weights"]["description"]),
        ("parameters", f"{report['parameters']:,} ({human_count(report['parameters'])})"),
        ("MACs (batch 1)", human_count(report["macs"])),
        ("nodes", report["node_count"]),
        ("file size", human_bytes(report["file_bytes"])),
        ("ORT latency", "not measured" if lat is None else
         f"median {lat['median_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms over {lat['runs']} runs "
         f"(batch 1, {lat['threads']} threads)"),
        ("model.onnx", model_path),
        ("report.json", report_path),
    ]
    hist = format_table(list(report["op_histogram"].items()), header=("op", "count"))
    return format_table(rows, header=("build", "")) + "\n\n" + hist


@main.command()
@click.argument("model", type=click.Path())
@_user_errors
def info(model: str) -> None:
    """Print parameters, MACs, op histogram, I/O shapes and opset of any ONNX MODEL."""
    proto = onnx_io.load_model(model)
    s = analysis.summarize(proto)
    rows: list[tuple[str, object]] = [
        ("parameters", f"{s.parameters:,} ({human_count(s.parameters)})"),
        ("MACs (batch 1)", human_count(s.macs) + (
            f" (shapes unknown for {len(s.macs_unknown_nodes)} nodes)"
            if s.macs_unknown_nodes else "")),
        ("nodes", s.node_count),
        ("opsets", ", ".join(f"{d} {v}" for d, v in s.opsets.items())),
        ("IR version", s.ir_version),
    ]
    rows += [(f"input {name}", analysis.format_shape(dims)) for name, dims in s.inputs]
    rows += [(f"output {name}", analysis.format_shape(dims)) for name, dims in s.outputs]
    click.echo(format_table(rows, header=(model, "")))
    click.echo()
    click.echo(format_table(list(s.op_histogram.items()), header=("op", "count")))


if __name__ == "__main__":
    main()
