"""The top floor: one run from its config (pipeline), its checks (validate, memory_plan), what it
returns (objective) and its own report."""
