"""Environment templates shipped with labvirt (``default.yaml``), loaded by an adapter."""
