"""The layers of DeepMind's NFNets, as the reference computes them (speed paths: ``accel/``)."""
from .activations import GAMMAS, Activation, apply_activation, gamma_of
from .conv import SameConv2d, WSConv2d, conv2d_same, same_conv_input, same_pads, standardize_weight
from .drop import StochasticDepthMask
from .se import SqueezeExcite

__all__ = ['GAMMAS', 'Activation', 'apply_activation', 'gamma_of', 'SameConv2d', 'WSConv2d', 'conv2d_same',
           'same_conv_input', 'same_pads', 'standardize_weight', 'StochasticDepthMask', 'SqueezeExcite']
