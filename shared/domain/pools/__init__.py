"""Warm pools: booted environments waiting for a learner, and the rules that size them.

Pure Python, one module per concept; import each name from the module that holds it:

- ``config``: which pools exist (``PoolKey``) and how big each may be (``PoolConfig``);
- ``environments``: the life of one pooled environment (booting -> ready -> claimed, or retired);
- ``sizing``: the queueing math that turns a load and a hit rate into a stock;
- ``demand``: what the claims have been, recently and by time of week;
- ``target``: the stock a pool should hold now, from its config, its demand and its refill time;
- ``plan``: the prewarmer's plan for one pool on one tick: what to create and what to retire;
- ``budget``: how many VMs a region's pools may hold together, and each pool's share of it.
"""
