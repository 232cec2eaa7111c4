"""A trained model used: loading and inference, evaluation and metrics, classification, temperature, Grad-CAM, exported models."""
