"""The bad-input corpus: every case builds one bad input in ``tmp_path`` and runs the real
``ddps`` command line on it (README, "Reliability")."""
