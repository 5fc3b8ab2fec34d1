"""The gateway: long-lived browser connections on one asyncio loop (event streams, terminals)."""
