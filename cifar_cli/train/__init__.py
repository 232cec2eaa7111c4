"""One training run: its set-up, the epoch loop and step, state and resume, logs, report, fine-tuning."""
