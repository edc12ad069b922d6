"""The C data plane and its Python loaders: the ring drain, the kick lane, the guards of shared memory and eventfds."""
