"""Ray job entrypoints (``python -m jobs.X``); thin glue over ``petl_platform``."""
