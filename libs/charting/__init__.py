"""Candlestick chart rendering: windows, presets, scales, the mplfinance figure and its fast path,
PNG encoding and the render pool.

A lib so that the charts service and the trainer's chart-classifier dataset draw with the very
same code (a chart the classifier was trained on looks exactly like one it is served); it imports
only libs.common and libs.indicators.
"""
