"""Settings: the pydantic models, `--set` parsing, YAML reading, durations, and the shipped presets."""
