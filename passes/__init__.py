"""Graph passes (imported as ``mvcompile.passes``)."""
