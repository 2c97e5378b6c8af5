"""The backprop library: layers, losses, initialisers and models on numpy or cupy.

Every array operation goes through an array module `xp` (numpy or cupy,
picked by `worker.device.select_device`); nothing here imports cupy.
"""
from worker.nn.conv import Conv2D, MaxPool2D
from worker.nn.layers import Dense, Dropout, Flatten, Layer, LeakyReLU, ReLU, Sigmoid, Tanh
from worker.nn.losses import cross_entropy_sum_and_correct, mse, softmax_cross_entropy
from worker.nn.model import Model, build_model
from worker.nn.norm import BatchNorm

__all__ = [
    "BatchNorm",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "Layer",
    "LeakyReLU",
    "MaxPool2D",
    "Model",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "build_model",
    "cross_entropy_sum_and_correct",
    "mse",
    "softmax_cross_entropy",
]
