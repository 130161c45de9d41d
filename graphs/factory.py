"""Create a MobileViT ``ir.Model`` from a config plus a checkpoint, or seeded random weights."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import onnx_ir as ir

from mvcompile.errors import UserError
from mvcompile.graphs.channel_order import check_choice, stem_to_rgb, trained_channel_order
from mvcompile.graphs.checkpoints import (
    CLASS_NAMES_KEY,
    CheckpointWeights,
    checkpoint_class_names,
    checkpoint_size,
    format_class_names,
    load_state_dict,
    to_hf_names,
)
from mvcompile.graphs.hf_config import (
    architecture_differences,
    check_built_as_configured,
    hf_config,
    other_preprocessing,
    patch_size_note,
)
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph
from mvcompile.graphs.random_weights import DEFAULT_SEED, RandomWeights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from, for reports."""

    kind: str  # "checkpoint" or "random"
    description: str
    # The channel order the checkpoint was trained on; the model takes RGB either way
    # (:mod:`mvcompile.graphs.channel_order`).
    trained_on: str = "rgb"


def parameter_shapes(cfg: MobileViTConfig) -> dict[str, tuple[int, ...]]:
    """Every initializer the graph for ``cfg`` asks for, in construction order."""
    source = RandomWeights(DEFAULT_SEED)
    build_graph(cfg, source)
    return {name: tuple(t.shape) for name, t in source.tensors.items()}


def describe(cfg: MobileViTConfig) -> str:
    return f"MobileViT-{cfg.size.upper()} with {cfg.num_classes} classes"


def create_mobilevit(
    cfg: MobileViTConfig, weights: str | Path | None = None, seed: int = DEFAULT_SEED,
    channel_order: str = "auto",
) -> tuple[ir.Model, WeightsInfo]:
    """Build the graph; with ``weights``, match the checkpoint strictly or raise UserError.
    ``channel_order`` is the one the checkpoint was trained on ("auto": detected, see
    :func:`.channel_order.trained_channel_order`); the model takes RGB either way."""
    check_choice(channel_order)
    if weights is None:
        log.info("No weights given: the weights are random (seed %d), not trained.", seed)
        model = build_graph(cfg, RandomWeights(seed))
        return model, WeightsInfo("random", f"random, seed {seed} (not trained)")
    eps = check_built_as_configured(weights)  # config.json settings no weight shape shows
    config = hf_config(weights)  # {} for a file outside a Hugging Face folder
    for note in (other_preprocessing(weights), patch_size_note(weights, config,
                                                               cfg.patch_sizes)):
        if note is not None:
            log.warning("%s", note)
    if eps is not None and eps != cfg.ln_eps:
        log.info("%s: LayerNorm epsilon %g, from its config.json", weights, eps)
        cfg = replace(cfg, ln_eps=eps)
    raw = load_state_dict(weights)
    if channel_order == "auto":
        order, why = trained_channel_order(weights, raw)
    else:
        order, why = channel_order, "as given"
    state = to_hf_names(raw, list(parameter_shapes(cfg)), cfg.depths)
    description = str(weights)
    if order == "bgr":
        state = stem_to_rgb(state)
        description += " (trained on BGR: the stem conv takes RGB instead)"
        log.info("%s expects BGR input (%s); its stem conv's input channels are reversed so "
                 "that the model takes RGB", weights, why)
    source = CheckpointWeights(state, str(weights))
    model = build_graph(cfg, source)
    try:
        source.raise_if_mismatched(describe(cfg), cfg.size, cfg.num_classes)
    except UserError as err:
        differ = architecture_differences(config, cfg.size)
        if differ and checkpoint_size(source.state) in (None, cfg.size):
            raise UserError(f"{weights}: its config.json describes another network than "
                            f"{describe(cfg)}: {'; '.join(differ)}. mvcompile builds "
                            "transformers' MobileViT at its three standard sizes only.") from err
        raise
    log.info("Loaded %d tensors from %s", len(source.requested), weights)
    record_class_names(model, checkpoint_class_names(weights), cfg.num_classes)
    return model, WeightsInfo("checkpoint", description, order)


def record_class_names(model: ir.Model, names: list[str] | None, num_classes: int) -> None:
    """Write ``names`` into the model's metadata (``mvcompile.class_names``, a JSON list) when
    there is one per output; ``mvcompile eval`` matches labelled folders against it."""
    if names is None:
        return
    if len(names) != num_classes:
        log.warning("Not recording the checkpoint's %d class names in a model with %d classes",
                    len(names), num_classes)
        return
    model.metadata_props[CLASS_NAMES_KEY] = format_class_names(names)
