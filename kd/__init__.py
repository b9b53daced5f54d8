"""The library under the recipes: typed config, data preparation, teacher scoring, training, students, evaluation.

Bottom to top (each layer imports only layers below it; an import-linter contract in the tests keeps it so):
``errors`` → ``config`` → ``files`` / ``tokenizer`` / ``relations`` → ``data`` | ``teacher`` → ``training`` →
``student`` → ``evaluation`` → ``config_checks`` (validation against the allowed values each part declares).
"""
