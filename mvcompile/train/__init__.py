"""Training MobileViT in PyTorch: the only part of mvcompile that imports torch.

Modules: ``model`` (the nn.Module mirroring :mod:`mvcompile.graphs.mobilevit`, same parameter
names), ``sampler`` (multi-scale batch sampler), ``data`` (image folder / digits, augmentation),
``recipe`` (AdamW, schedule, EMA), ``loop`` (training, DDP), ``checkpoint`` and ``outputs``
(run folder files), ``plot`` (curves PNG), ``cli`` (``mvcompile train``). Importing this
package does not import torch; ``sampler`` and ``data`` work without it.
"""
