"""The machine: devices and precision, distributed process groups, rank agreement, memory settings."""
