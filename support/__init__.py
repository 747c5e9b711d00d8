"""Test and benchmark support (not installed): offline models, task data, evaluation."""
