"""A minimal firmware image that lets a guest-less QEMU VM run idle."""

from __future__ import annotations

BIOS_SIZE = 64 * 1024
RESET_VECTOR_OFFSET = BIOS_SIZE - 16  # maps to physical 0xFFFF0 (and 0xFFFFFFF0)

# Real-mode x86 at the reset vector:
#   fa      cli           ; no interrupts can wake us
#   f4      hlt           ; sleep (offset 1)
#   eb fd   jmp short -3  ; if woken anyway (NMI/SMI), back to the hlt
_RESET_CODE = bytes((0xFA, 0xF4, 0xEB, 0xFD))


def idle_bios() -> bytes:
    """Return a 64 KiB ``-bios`` image whose CPU just halts forever.

    QEMU maps a 64 KiB BIOS image at the top of the first megabyte, so its
    last 16 bytes (offset 0xFFF0) sit at the x86 reset vector 0xFFFF0, where
    the CPU starts executing in real mode.  Those bytes are ``fa f4 eb fd``
    (``cli; hlt; jmp $-3`` -- disable interrupts, halt, and jump back to the
    ``hlt`` should anything wake the CPU), then zero padding.  Everything
    before the reset vector is zero.

    With it a VM can be *running* (so vhost-user rings can be started, which
    QEMU does not do while paused with ``-S``) without any guest OS, while a
    test drives the virtio device itself through ``-qtest``.
    """
    image = bytearray(BIOS_SIZE)
    image[RESET_VECTOR_OFFSET : RESET_VECTOR_OFFSET + len(_RESET_CODE)] = _RESET_CODE
    return bytes(image)
