"""nn.Modules built from recipes: the short convolution (Eq. 56) and the Mixer layer."""

from ttr.nn.conv import ShortConv
from ttr.nn.mixer import Mixer, MixerConfig, MixerState

__all__ = ["Mixer", "MixerConfig", "MixerState", "ShortConv"]
