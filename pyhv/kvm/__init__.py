"""Thin, typed bindings to /dev/kvm: one method per ioctl."""
from pyhv.kvm.flavour import KvmFlavour, detect_flavour
from pyhv.kvm.system import IoEventFd, Kvm, Vcpu, Vm, ioctl

__all__ = ["Kvm", "Vm", "Vcpu", "IoEventFd", "KvmFlavour", "detect_flavour", "ioctl"]
