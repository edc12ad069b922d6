"""The cpufreq device: its virtqueues and config space (``device.py``), and the host frequency model it publishes."""
