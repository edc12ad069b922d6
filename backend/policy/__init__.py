"""Pure decisions with injected time: the clamp engine, the device-to-policy interface, rate limits and batching."""
