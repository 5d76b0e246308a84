"""The ground floor: models, data, the one training loop, evaluation and records, which every method
and the runner stand on. It imports nothing above it (tests/test_floors.py)."""
