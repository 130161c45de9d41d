"""INT8 post-training calibration (imported as ``mvcompile.calibration``)."""
