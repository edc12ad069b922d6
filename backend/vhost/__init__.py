"""The vhost-user back-end, device-agnostic: the socket transport, the session, guest memory, the device interface."""
