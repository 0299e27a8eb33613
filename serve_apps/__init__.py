"""Ray Serve applications (``import_path`` targets) and their Serve YAML configs."""

import os

# the config `petl serve` and `petl demo` run when none is named
LOCAL_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "local.yaml")
