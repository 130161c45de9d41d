"""The PyTorch mirror of the ONNX graph: same names, same numbers."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from mvcompile import onnx_io  # noqa: E402
from mvcompile.graphs.factory import parameter_shapes  # noqa: E402
from mvcompile.graphs.mobilevit import MobileViTConfig, build_graph  # noqa: E402
from mvcompile.graphs.random_weights import RandomWeights  # noqa: E402
from mvcompile.train.model import MobileViT, export_state_dict, parameter_count  # noqa: E402

PARAMS = {"xxs": 1_272_024, "xs": 2_317_848, "s": 5_578_632}  # DESIGN.md, 1000 classes


def _ort_logits(cfg: MobileViTConfig, source: RandomWeights, x: np.ndarray) -> np.ndarray:
    proto = onnx_io.to_proto(build_graph(cfg, source))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"pixel_values": x})[0]


@pytest.mark.parametrize(("size", "patch", "res", "classes"), [
    ("xxs", "A", 64, 1000), ("xs", "A", 64, 7), ("s", "A", 64, 10), ("xxs", "B", 128, 10),
])
def test_torch_module_matches_onnx_graph(size: str, patch: str, res: int, classes: int) -> None:
    cfg = MobileViTConfig.for_size(size, resolution=res, patch_config=patch,
                                   num_classes=classes)
    source = RandomWeights(seed=3)
    x = np.random.default_rng(1).uniform(0, 1, (2, 3, res, res)).astype(np.float32)
    expected = _ort_logits(cfg, source, x)

    model = MobileViT(cfg).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in source.tensors.items()}, strict=False)
    assert unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in missing)
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    assert got.shape == (2, classes)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # random weights give non-trivial logits


@pytest.mark.parametrize("size", ["xxs", "xs", "s"])
def test_state_dict_names_and_shapes_are_the_graph_initializers(size: str) -> None:
    cfg = MobileViTConfig.for_size(size, resolution=64)
    model = MobileViT(cfg)
    exported = export_state_dict(model)
    shapes = parameter_shapes(cfg)
    assert list(exported) == list(shapes)  # same names, same order
    assert {k: tuple(v.shape) for k, v in exported.items()} == shapes
    assert parameter_count(model) == PARAMS[size]
    bn_buffers = [k for k, _ in model.named_buffers() if k.endswith("running_var")]
    assert bn_buffers and all(k in exported for k in bn_buffers)


def test_module_runs_at_any_valid_resolution() -> None:
    model = MobileViT(MobileViTConfig.for_size("xxs", resolution=64, num_classes=3)).eval()
    with torch.no_grad():
        for res in (64, 128, 192):
            assert model(torch.zeros(1, 3, res, res)).shape == (1, 3)
