"""The clock: the speed probe (precision and layout), FLOPs, the plan and its re-plans, the recipe ladder."""
