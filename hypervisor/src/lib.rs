//! Safe KVM layer.
