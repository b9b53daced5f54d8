"""Data preparation: rows of every format → records → aligned teacher/student sequences (stage one's input)."""
