"""The vhost-user-cpufreq service: asyncio transport, sessions, the cpufreq device, policy and actuators."""
