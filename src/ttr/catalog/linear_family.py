"""Uniform weights, linear function class on features, one GD step from zero (Eq. 20-24):
linear attention and the feature maps proposed for it. Each layer normalizes its output by
z^T phi(q) with z = sum_i phi(k_i) (Eq. 13, MixerConfig.normalize), as its paper does, unless
noted."""

from __future__ import annotations

from ttr.catalog.registry import Built, entry
from ttr.recipe import FunctionClass, Optimizer, Recipe, Weights


def _features(name: str, **feature_options) -> Built:
    recipe = Recipe(Weights.uniform(), FunctionClass.features(name), Optimizer.gd())
    return Built(recipe, feature_options=feature_options or None)


@entry("linear_attention", "linear attention",
       "Katharopoulos et al. 2020, Transformers are RNNs (ICML)",
       normalize=True)
def linear_attention(config):
    """Linear attention (Katharopoulos et al. 2020, Eq. 4-6): phi(x) = elu(x) + 1, output
    S^T phi(q) / z^T phi(q). The paper's Eq. 24: one GD step from M = 0 with uniform weights."""
    return _features("elu1")


@entry("performer", "linear attention",
       "Choromanski et al. 2021, Rethinking Attention with Performers (ICLR)",
       normalize=True)
def performer(config, *, num_features: int | None = None):
    """Performer / FAVOR+ (Choromanski et al. 2021, Lemma 1): positive orthogonal random
    features, E[phi(q).phi(k)] = exp(q.k). The draw is a buffer fixed at construction (saved
    with the model); the paper also redraws it periodically during training, which is left to
    the user (re-create the FeatureMap)."""
    return _features("favor_plus", num_features=num_features)


@entry("rfa", "linear attention",
       "Peng et al. 2021, Random Feature Attention (ICLR)",
       qk_norm=True, output_norm="rms")
def rfa(config, *, num_features: int | None = None, sigma: float = 1.0):
    """Random Feature Attention (Peng et al. 2021, Eq. 3-5): random Fourier features
    [sin(Wx), cos(Wx)] of the Gaussian kernel. Deviation: RFA's random Fourier features are not
    positive, so the normalizer z^T phi(q) can cross zero; RFA divides anyway, here the output
    is RMS-normalized per head instead. q and k are unit-normalized, as in RFA. The gated
    variant RFA-Gate is the geometric-decay recipe, not a separate entry."""
    return _features("rfa", num_features=num_features, sigma=sigma)


@entry("cosformer", "linear attention",
       "Qin et al. 2022, cosFormer: Rethinking Softmax in Attention (ICLR)",
       normalize=True)
def cosformer(config):
    """cosFormer (Qin et al. 2022, Eq. 8-11): relu features re-weighted by
    cos(pi/2 (t - i) / M), split into cos/sin features by position. M is fixed (4096, the
    FeatureMap's horizon) instead of the sequence length, so that decoding is causal; positions
    are carried in the MixerState."""
    return _features("cosformer")


@entry("hedgehog", "linear attention",
       "Zhang et al. 2024, The Hedgehog & the Porcupine (ICLR)",
       normalize=True)
def hedgehog(config):
    """Hedgehog (Zhang et al. 2024, Eq. 4): a learned map phi(x) = [softmax(Wx + b),
    softmax(-Wx - b)], trained end to end here (the paper's optional attention-distillation
    loss that mimics softmax is not part of the layer)."""
    return _features("hedgehog")


@entry("based", "linear attention",
       "Arora et al. 2024, Simple linear attention language models balance the recall-throughput"
       " tradeoff (ICML)",
       normalize=True, d_key=16)
def based(config):
    """Based (Arora et al. 2024, Section 4): the 2nd-order Taylor map of exp(q.k/sqrt D) on a
    small feature dimension (d_key = 16, so D_phi = 1 + 16 + 256). The full Based model also
    interleaves sliding-window softmax layers; that is a model choice (a hybrid), not this
    layer."""
    return _features("based")


@entry("rebased", "linear attention",
       "Aksenov et al. 2024, Linear Transformers with Learnable Kernel Functions are Better "
       "In-Context Models (ACL)",
       normalize=True, d_key=16)
def rebased(config):
    """ReBased (Aksenov et al. 2024, Eq. 6): phi(x) = z (x) z with z = gamma LN(x) + beta
    learned, a purely quadratic kernel (z_q.z_k)^2, d_key = 16 as Based."""
    return _features("rebased")


@entry("dijiang", "linear attention",
       "Chen et al. 2024, DiJiang: Efficient Large Language Models through Compact Kernelization "
       "(ICML)",
       qk_norm=True, normalize=True)
def dijiang(config):
    """DiJiang (Chen et al. 2024, Eq. 10-14): weighted quasi-Monte-Carlo features on the DCT of
    x, phi(x) = w * exp(T C x); the weights are learned, the QMC radii fixed. Deviation: q and
    k are unit-normalized first, which bounds the exponent (without it, training overflowed in
    float32 within 300 steps of a small MQAR)."""
    return _features("dijiang")
