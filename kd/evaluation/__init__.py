"""Evaluation pieces: generation, answer extraction, metrics, the SFT baseline and the report files."""
