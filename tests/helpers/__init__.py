"""Helpers shared by the test packages: tiny configs, a random tiny teacher, training-run helpers."""
