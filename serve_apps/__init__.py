"""Ray Serve applications (``import_path`` targets) and their Serve YAML configs."""
