"""The lean anytime-reasoning trainer: budgets, rollout engines, rewards, loss and loop."""
