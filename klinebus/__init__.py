"""The composition root: the command line, the demo, the in-process pipeline and AsyncAPI generation.

It sits above the services and imports them; nothing imports it (tests/test_layers.py).
"""
