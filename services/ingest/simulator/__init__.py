"""The exchange simulator: a Binance-speaking server on loopback replaying real candles."""

from services.ingest.simulator.faults import FaultPlan
from services.ingest.simulator.server import ExchangeSimulator
from services.ingest.simulator.stats import SimulatorStats
from services.ingest.simulator.data import load_candles, many_streams

__all__ = ["ExchangeSimulator", "FaultPlan", "SimulatorStats", "load_candles", "many_streams"]
