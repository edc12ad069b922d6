"""Sans-IO protocol layer: vhost-user messages, split virtqueues, the cpufreq device ABI.

Nothing here touches sockets, file descriptors (beyond carrying their numbers),
asyncio or system calls: bytes in, typed objects out, and back.
"""
