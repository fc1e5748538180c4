"""What the launcher and the stages agree on, importable by both without torch: digests and
atomic writes, the run folder's layout and exit codes, spec.json, and the registry of stage kinds."""
