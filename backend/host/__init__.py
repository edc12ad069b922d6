"""The host's edges: CPU model from sysfs, hotplug, vCPU threads, clamp actuators, the policy shell, the state file."""
