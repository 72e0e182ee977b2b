"""The ``lcnn-zoo`` command and its parts: the application wing of the package.

The library (``lcnn_zoo.layers``, ``lcnn_zoo.models``, ``lcnnify``, ``fold``, the penalty, the
measurements, ``lcnn_zoo.hub``) never imports from here (``tests/test_wings.py``); these modules
build run folders, read and write files and parse command lines on top of it.
"""
