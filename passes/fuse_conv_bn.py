"""fuse-conv-bn: fold an inference BatchNormalization into the Conv/ConvTranspose before it."""

from __future__ import annotations

from onnxopt.passes.fuse_affine import FuseAffine


class FuseConvBatchNorm(FuseAffine):
    """Fold BatchNormalization (inference) into the preceding Conv/ConvTranspose's weights and bias.

    ``fuse-affine`` restricted to Conv/ConvTranspose followed by BatchNormalization (the spelling
    kept for pipelines that name it).  With ``s = scale / sqrt(var + eps)``: ``W' = W * s`` along
    the output-channel axis, ``B' = (B - mean) * s + bias``, computed in float64 and stored in W's
    dtype.  Declines (with reasons) when the conv output has other users, BN is in training mode,
    parameters are not constant, or the ConvTranspose is grouped.  Outputs within float rounding.
    """

    name = "fuse-conv-bn"
    PRODUCERS = ("Conv", "ConvTranspose")
    CONSUMERS = ("BatchNormalization",)
