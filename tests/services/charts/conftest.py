"""The chart fixtures of tests/libs/charting (real candles with their indicators)."""

from tests.libs.charting.conftest import frame, full  # noqa: F401
