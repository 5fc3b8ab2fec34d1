"""labvirt's Prometheus metrics: every series is named ``labvirt_*`` and labelled by template,
region, outcome, reason, verb, code or kind, never by session or user.

Two kinds of series, kept apart:

- What a process records as it works (``series``): session requests, time to ready,
  provisioning, Kubernetes calls, sessions ended, dead letters recorded, orphans deleted.
  ``series()`` builds them the first time a process records one, never at import: the process's
  entry point first chooses where values live (``multiprocess``). ``labvirt api`` (gunicorn
  may fork several workers) and ``labvirt worker`` run in prometheus_client's multiprocess
  mode, each process writing its values to files of a fresh directory its process group
  owns; a scrape of any process of the group merges them. The gateway and beat keep theirs in
  memory (``process_registry``).
- What Redis knows (``state``): each pool's target, ready and booting environments, dead
  letters waiting for an operator, regions up or drained. They are read when scraped, so they
  are right whichever process answers, and the API serves them (several API replicas report
  the same values: aggregate them with ``max``).

Every process serves ``GET /metrics`` to an admin token or a scrape token
(``LABVIRT_METRICS_TOKENS``; ``access``): the API and the gateway on their own ports, workers
and beat on ``LABVIRT_METRICS_PORT`` (``server``).
"""
