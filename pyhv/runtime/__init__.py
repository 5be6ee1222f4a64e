"""The runtime layer: the I/O event loop (`IoThread`) and character back ends (`Chardev`) that virtio, vhost,
the machine and the front ends share (rust-vmm's event-manager is the model)."""
