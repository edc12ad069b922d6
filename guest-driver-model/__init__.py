"""The guest side: a model of the cpufreq guest driver and the transports it runs over.

``frontend.py`` plays QEMU's role (a vhost-user front-end with memfd guest RAM),
``driver.py`` plays the guest kernel driver, ``workload.py`` the guest's
scheduler load.  ``linux/`` will hold the real guest kernel module.
"""
