"""Fixtures of the fault-tolerance tests (issue #9). Their ledgers come from the root conftest:
``db_url`` (a SQLite file, then a fresh PostgreSQL database), ``pg_fresh_url``. PostgreSQL needs
``PREFLOOP_TEST_PG_URL`` (``.ci/test`` or ``scripts/fault_suite.py`` starts a server and sets
it); where it is missing the PostgreSQL cases fail, never skip.
"""
