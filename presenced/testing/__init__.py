"""Test support: a simulated network for running whole clusters under trio's MockClock."""

from presenced.testing.simnet import (
    DEFAULT_MAX_IN_FLIGHT,
    SimChannel,
    SimNetwork,
    SimStats,
    SimTransport,
)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "SimChannel", "SimNetwork", "SimStats", "SimTransport"]
