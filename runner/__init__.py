"""The top floor: one run from its config (pipeline), its checks (validate, memory_plan) and what it returns (objective)."""
