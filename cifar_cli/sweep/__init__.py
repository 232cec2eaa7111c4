"""Many runs: grids and random draws of settings (`cifar sweep`), their axes, shared Optuna studies."""
