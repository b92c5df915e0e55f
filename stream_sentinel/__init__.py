"""Stream Sentinel."""
