"""Observers on known distributions, and the range → (scale, zero point) maths."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from mvcompile.calibration import qparams
from mvcompile.calibration.observers import (
    OBSERVERS,
    EntropyObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MseObserver,
    PercentileObserver,
    make_observer,
)


def test_minmax_over_batches() -> None:
    obs = MinMaxObserver()
    obs.update(np.array([0.5, -3.0, 1.0]))
    obs.update(np.array([5.0, -1.0]))
    obs.update(np.array([]))
    assert obs.compute_range() == (-3.0, 5.0)


def test_moving_average_minmax() -> None:
    obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
    obs.update(np.array([-1.0, 2.0]))  # first batch sets the range
    obs.update(np.array([-3.0, 4.0]))  # lo = -1 + 0.5·(-3 + 1), hi = 2 + 0.5·(4 - 2)
    assert obs.compute_range() == (-2.0, 3.0)


def test_percentile_on_one_value_per_bin() -> None:
    # Integers -1024..1023 with 2048 bins over [-1024, 1024]: one value per bin, so the
    # 0.1% tails are exactly 2.048 values, and the range ends at the edges of bins 2 and 2045.
    obs = PercentileObserver(percentile=99.9, bins=2048)
    values = np.arange(-1024, 1024, dtype=np.float32)
    for chunk in np.array_split(values, 4):
        obs.update(chunk)
    assert obs.compute_range() == (-1022.0, 1022.0)


def test_histogram_range_grows_without_losing_counts() -> None:
    obs = PercentileObserver(percentile=100.0, bins=64)
    obs.update(np.full(10, 0.5, np.float32))
    obs.update(np.full(10, 7.0, np.float32))  # doubles the histogram range 0.5 -> 8
    assert obs.limit == 8.0
    assert obs.counts.sum() == 20
    lo, hi = obs.compute_range()
    assert lo == 0.5 and hi == 7.0  # clipped to the values actually seen


def test_entropy_keeps_the_full_range_of_a_uniform_distribution() -> None:
    obs = EntropyObserver()
    obs.update(np.linspace(-1.0, 1.0, 100_001, dtype=np.float32))
    assert obs.compute_range() == (-1.0, 1.0)


def test_mse_keeps_two_spikes_exactly() -> None:
    obs = MseObserver()
    obs.update(np.array([-1.0, 0.0, 1.0] * 1000, dtype=np.float32))
    assert obs.compute_range() == (-1.0, 1.0)


@pytest.mark.parametrize("observer", [EntropyObserver, PercentileObserver])
def test_clipping_observers_ignore_a_single_outlier(observer: type) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 1.0, 200_000).astype(np.float32)
    data[0] = 50.0  # a 50-sigma activation outlier
    obs = observer()
    obs.update(data)
    lo, hi = obs.compute_range()
    assert -10.0 < lo < -2.0 and 2.0 < hi <= 25.0


def test_mse_range_has_lower_error_than_minmax() -> None:
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.normal(0, 1, 100_000), rng.normal(0, 1, 20) * 40])
    data = data.astype(np.float32)

    def error(lo: float, hi: float) -> float:
        scale, zp = qparams.quant_params(lo, hi)
        q = np.clip(np.round(data / scale) + int(zp), 0, 255)
        return float(np.mean(((q - int(zp)) * scale - data) ** 2))

    mse, minmax = MseObserver(), MinMaxObserver()
    mse.update(data)
    minmax.update(data)
    assert error(*mse.compute_range()) < error(*minmax.compute_range())


@pytest.mark.parametrize("method", list(OBSERVERS))
def test_every_observer_refuses_to_answer_without_data(method: str) -> None:
    with pytest.raises(ValueError, match="no data"):
        make_observer(method).compute_range()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("method", list(OBSERVERS))
def test_every_observer_refuses_non_finite_values_and_keeps_its_range(method: str,
                                                                     bad: float) -> None:
    observer = make_observer(method)
    observer.update(np.linspace(-1.0, 2.0, 1001, dtype=np.float32))
    before = observer.compute_range()
    with pytest.raises(ValueError, match="NaN or infinity"):
        observer.update(np.array([0.5, bad], dtype=np.float32))
    assert observer.compute_range() == before


def test_asymmetric_uint8_params() -> None:
    scale, zp = qparams.quant_params(-1.0, 3.0, "uint8")
    assert scale == np.float32(4.0 / 255) and zp == 64 and zp.dtype == np.uint8


def test_symmetric_int8_params() -> None:
    scale, zp = qparams.quant_params(-2.0, 1.0, "int8", symmetric=True)
    assert scale == np.float32(2.0 / 127) and zp == 0 and zp.dtype == np.int8


def test_ranges_are_widened_to_include_zero() -> None:
    scale, zp = qparams.quant_params(2.0, 2.0, "uint8")  # -> [0, 2]
    assert scale == np.float32(2.0 / 255) and zp == 0
    scale, zp = qparams.quant_params(-3.0, -1.0, "uint8")  # -> [-3, 0]
    assert scale == np.float32(3.0 / 255) and zp == 255


def test_degenerate_zero_range_gets_a_usable_scale() -> None:
    for symmetric, dtype in ((False, "uint8"), (True, "int8")):
        scale, zp = qparams.quant_params(0.0, 0.0, dtype, symmetric=symmetric)
        assert scale > 0 and np.isfinite(1.0 / scale)
        assert int(zp) in (0, 128)


@pytest.mark.parametrize("lo, hi", [(1.0, -1.0), (np.nan, 1.0), (0.0, np.inf)])
def test_invalid_ranges_raise(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="invalid range"):
        qparams.quant_params(lo, hi)


def test_per_channel_weights_and_bias() -> None:
    weight = np.array([[[[1.0, -2.0]]], [[[0.0, 0.0]]], [[[0.5, 0.25]]]], dtype=np.float32)
    scales = qparams.weight_scales(weight, axis=0)
    np.testing.assert_allclose(scales, [2.0 / 127, 1.0, 0.5 / 127], rtol=1e-6)
    q = qparams.quantize_weight(weight, scales, axis=0)
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q[:, 0, 0, :], [[64, -127], [0, 0], [127, 64]])
    bias_q, bias_scales = qparams.quantize_bias(np.array([1.0, 0.0, -0.5]), 0.1, scales)
    assert bias_q.dtype == np.int32
    np.testing.assert_allclose(bias_q * bias_scales, [1.0, 0.0, -0.5], atol=1e-3)


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_entropy_keeps_a_constant_tensor_whichever_its_sign(sign: float) -> None:
    """All values −3: the whole histogram is the only window with the data in it. The search
    used to stop one step short of it and clip −3 to −0.37; +3 was kept."""
    obs = EntropyObserver()
    obs.update(np.full(1000, 3.0 * sign, np.float32))
    lo, hi = obs.compute_range()
    assert min(lo, 0.0) <= 3.0 * sign <= max(hi, 0.0)


def test_bias_out_of_int32_range_is_detected_and_saturates_without_wrapping() -> None:
    """b / (s_x·s_w) = 1 / 1e-11 ≫ 2³¹: in float32 the clip bound 2³¹ − 1 became 2³¹, which
    wrapped to −2³¹ (the bias changed sign)."""
    bias, scales = np.array([1.0, -2.0], np.float32), np.array([1e-5, 1e-5], np.float32)
    assert not qparams.bias_fits_int32(bias, 1e-6, scales)
    assert qparams.bias_fits_int32(bias, 1e-2, scales)
    q, _ = qparams.quantize_bias(bias, 1e-6, scales)
    assert q.tolist() == [2**31 - 1, -(2**31)]


@pytest.mark.parametrize("method", list(OBSERVERS))
def test_vanishing_activations_get_a_range(method: str) -> None:
    """Activations near 1e-43 (an untrained checkpoint): the histogram's float32 bin edges
    over [−peak, peak] were not distinct, and np.histogram raised."""
    observer = make_observer(method)
    observer.update(np.array([1e-43, -2e-43, 0.0], np.float32))
    observer.update(np.array([3e-43], np.float32))
    lo, hi = observer.compute_range()
    assert lo <= 0.0 <= hi and hi - lo < 1e-40


def test_an_all_zero_input_keeps_the_convs_bias_exact() -> None:
    """Scale 1.0 for an all-zero range quantized the conv's bias at 1.0·s_w: its outputs
    [0.004, -0.006, 0.01, 0.002] came out [0.0051, -0.0060, 0.0100, 0.0]. At the tiny scale
    the bias overflows int32, so the conv is kept in float and its output is the bias."""
    import onnx.parser
    import onnx_ir as ir

    from mvcompile import onnx_io
    from mvcompile.calibration.data import ImageSet
    from mvcompile.calibration.quantize import QuantizeOptions, quantize

    assert qparams.quant_params(0.0, 0.0)[0] == np.float32(qparams.MIN_SCALE)
    model = ir.serde.deserialize_model(onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 24]>
        m (float[N, 3, 4, 4] x) => (float[N, 4, 4, 4] y)
          <float[4, 3, 1, 1] w = {1,2,3,4,5,6,7,8,9,10,11,12},
           float[4] b = {0.004, -0.006, 0.01, 0.002}> {
            z = Mul (x, zero)
            y = Conv (z, w, b)
        }""".replace("<float[4, 3", "<float zero = {0.0}, float[4, 3")))
    images = ImageSet(np.random.default_rng(0).uniform(0, 1, (4, 3, 4, 4)).astype(np.float32))
    quantized, report = quantize(model, images, QuantizeOptions(report_accuracy=False,
                                                                op_types=frozenset({"Conv"})))
    assert [k["node"] for k in report.kept_float] == [n.name for n in quantized.graph
                                                      if n.op_type == "Conv"]
    session = ort.InferenceSession(onnx_io.to_proto(quantized).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    out = session.run(None, {"x": images.pixels})[0]
    np.testing.assert_allclose(out[:, :, 0, 0], np.tile([0.004, -0.006, 0.01, 0.002], (4, 1)),
                               rtol=1e-6)
