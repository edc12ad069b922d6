"""Fuzzing of the back-end: hostile front-ends and hostile guests.

``harness`` holds the generators, the mutators and the driver (:class:`~.harness.FuzzBed`);
``campaign`` is the command-line campaign (``python -m tests.fuzz.campaign --seconds N``);
``tests/test_fuzz.py`` runs a fixed, CI-sized budget of both.
"""
