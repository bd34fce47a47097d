"""Per-device backends of a format's op, as ``torch.library`` registrations.

Every op of a format is a ``torch.library.custom_op`` whose default implementation is the
format's pure-torch reference (the spec). A faster implementation for one device type is
registered with :meth:`DeviceBackends.register`: the first registration for a device type
adds a ``torch.library`` kernel for it (``op.register_kernel(device_type)``); that kernel
runs the current implementation from :attr:`DeviceBackends.impls` (a plain dict, so tests
can swap or remove an implementation for a while) and falls back to the reference when the
implementation declines a case (returns ``None``) or none is set. Nothing touches a device
when registering.
"""

from __future__ import annotations

from typing import Callable


class DeviceBackends:
    """The per-device implementations of one custom op."""

    def __init__(self, op, reference: Callable):
        self.op = op
        self.reference = reference
        self.impls: dict[str, Callable] = {}
        self._kernels: set[str] = set()

    def register(self, device_type: str, impl: Callable | None) -> None:
        """Route the op on ``device_type`` tensors to ``impl`` (``None`` restores the reference).
        ``impl`` has the op's signature and may return ``None`` to fall back to the reference."""
        if impl is None:
            self.impls.pop(device_type, None)
            return
        self.impls[device_type] = impl
        if device_type not in self._kernels:
            self._kernels.add(device_type)
            self.op.register_kernel(device_type)(self._kernel(device_type))

    def _kernel(self, device_type: str) -> Callable:
        impls, reference = self.impls, self.reference

        def kernel(*args):
            impl = impls.get(device_type)
            if impl is not None:
                out = impl(*args)
                if out is not None:
                    return out
            return reference(*args)

        kernel.__name__ = f"{getattr(self.op, '_name', 'op')}_{device_type}"
        return kernel
