"""The vhost-user-cpufreq service, in sub-packages that follow the data path.

Imports go one way, from the bottom up (``tests/test_layering.py`` holds the order):
``counters``/``defaults`` (leaves) <- ``policy`` (pure decisions) <- ``dataplane`` (the C plane
that runs them, and the guards) <- ``vhost`` (transport, session, memory, device interface) <-
``cpufreq`` (the device) <- ``host`` (sysfs, threads, actuators, the policy shell) <- ``service``.
"""
