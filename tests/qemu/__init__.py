"""Running a real QEMU against the back-end (see fixture.py)."""
