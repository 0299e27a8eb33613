"""Every Ray integration, above the Ray-free core: one owner of a Ray connection (``connect``), a
fine-tune on Ray Train (``train``), sweeps on Ray Tune (``tune``), the VTAB-1k suite
(``vtab_suite``), the Jobs API (``jobs``), offline scoring on Ray Data (``batch``) and token auth
(``auth``). Nothing below this package imports Ray (tests/test_layers.py)."""
