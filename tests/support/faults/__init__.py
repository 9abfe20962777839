"""The fault suite's scenarios (issue 9), shared by ``bench/fault_suite.py`` and the tests.

Each scenario function starts real parts (Envoy, the ext_authz server as a process,
PostgreSQL, the demo services, the approvals service), puts a bounded load of calls through
the gateway, injects one fault, and returns a ``ScenarioResult``: the numbers of the suite's
table and the goals the scenario must meet (``result.unmet()`` is empty when all hold).

- ``outcome``: ``ScenarioResult``, ``Goal`` and the table;
- ``load``: ``MixedLoad``, callers whose right answers are known, so wrong allows are counted;
- ``audit_count``: decision ids answered (Envoy's access log) against audit events written;
- ``pg``: a fresh PostgreSQL database, and a DSN through a ``TcpProxy`` relay;
- ``store_faults``, ``replica_faults``, ``reflection_faults``, ``slack_faults``,
  ``forged_checks``: the scenarios.
"""
